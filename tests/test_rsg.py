"""RSG (models/rsg.py, methods/rsg.py, models/cifar_resnet.py rsg=True): parameter counts, the
plain network at inference, L_cesc and L_mv by hand on tiny maps, float64 gradcheck of the
differentiable pieces, the segment pairing, the step's loss, exact resume, bad parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.rsg import head_classes
from longtail.models import build_model
from longtail.models.rsg import RSGModule

RSG = {"method.name": "rsg", "model.name": "resnet20",
       "model.params": {"rsg": True, "rsg_centers": 3, "rsg_dim": 8}, "method.params": {"head_ratio": 0.5}}


def test_parameters_and_inference_is_the_plain_network():
    torch.manual_seed(0)
    plain = build_model("resnet32", num_classes=10)
    torch.manual_seed(0)
    rsg = build_model("resnet32", num_classes=10, params={"rsg": True})
    assert sum(p.numel() for p in plain.parameters()) == 464_154
    # A 10x32x15 + b 10x15 + centres 10x15x32 + T 32*32*9+32 + g (64*256+256) + (256*256*9+256) + fc 256*2+2
    assert sum(p.numel() for p in rsg.rsg.parameters()) == 4800 + 150 + 4800 + 9248 + 16640 + 590080 + 514
    base = {k: v for k, v in rsg.state_dict().items() if not k.startswith("rsg.")}
    assert base.keys() == plain.state_dict().keys()
    assert all(torch.equal(base[k], plain.state_dict()[k]) for k in base)  # same backbone init
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.nn.init.normal_(rsg.rsg.vec_transformation.weight)  # the module never runs outside rsg_pass
        assert torch.equal(plain.eval()(images), rsg.eval()(images))
        assert torch.equal(plain.train()(images), rsg.train()(images))
    with pytest.raises(RuntimeError, match="rsg"):
        with plain.rsg_pass(lambda m: m):
            pass


def _module(channels=2, classes=3, k=2, dim=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return RSGModule(channels=channels, num_classes=classes, n_center=k, contrastive_dim=dim).to(dtype)


def test_cesc_distance_by_hand():
    m = _module()
    with torch.no_grad():
        m.centers.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))
        m.linear.zero_()
        m.bias.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    maps = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]], [[[3.0, 3.0]], [[1.0, 1.0]]]])  # (2, C=2, H=1, W=2)
    target = torch.tensor([0, 1])
    gamma = m.assignment(maps, target)
    assert torch.allclose(gamma, torch.full((2, 2), 0.5))  # A = 0, b = 0: uniform over the centres
    # sample 0 (class 0): centre (1, 0): (0+0) + (0+4) = 4; centre (0, 2): (1+1) + (4+0) = 6
    # sample 1 (class 1): centre (0, 0): 9+9+1+1 = 20; centre (1, 1): 4+4+0+0 = 8
    want = (0.5 * 4 + 0.5 * 6 + 0.5 * 20 + 0.5 * 8) / 2
    assert m.cesc_distance(maps, target, gamma).item() == pytest.approx(want)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    g0 = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(m.assignment(maps, target)[0], g0)


def test_transfer_terms_by_hand():
    m = _module(channels=2, classes=2, k=1, dim=4)
    with torch.no_grad():
        m.centers.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
        m.vec_transformation.weight.zero_()
        m.vec_transformation.weight[0, 0, 1, 1] = 1.0  # T = identity on channel 0, 0 on channel 1
        m.vec_transformation.weight[1, 1, 1, 1] = 1.0
        m.vec_transformation.bias.zero_()
    heads = torch.tensor([[[[3.0]], [[4.0]]]])  # (1, 2, 1, 1): var map = (3-1, 4-0) = (2, 4)
    tails = torch.tensor([[[[0.0]], [[3.0]]]])  # tail vector = (0, 3-1) = (0, 2)
    loss, new = m.transfer(heads, torch.tensor([0]), tails, torch.tensor([1]))
    assert torch.allclose(new, tails + torch.tensor([2.0, 4.0]).view(1, 2, 1, 1))
    # |  ||(2,4)|| - ||(2,4)|| | = 0;  sum |nrm(0,2) * nrm(2,4) - 1| = |0 - 1| + |1 * 4/sqrt(20) - 1|
    geometric = 1.0 + abs(4 / 20 ** 0.5 - 1)
    pair = m.pair_logits(heads, torch.tensor([2.0, 4.0]).view(1, 2, 1, 1))
    want = F.cross_entropy(pair, torch.tensor([0])).item() + geometric
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert m.vec_transformation.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in (*m.contrastive.parameters(), *m.contrastive_fc.parameters()))  # frozen
    assert m.centers.grad is None and m.linear.grad is None  # centres and gammas detached in L_mv


def test_rows_official_versus_channel():
    m = _module(channels=2, classes=2, k=1)
    maps = torch.arange(8.0).view(1, 2, 2, 2)
    official = maps.reshape(-1, 2)  # C consecutive memory values: (0, 1), (2, 3) from channel 0 ...
    assert torch.equal(official[0], torch.tensor([0.0, 1.0]))
    channel = maps.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(channel[0], torch.tensor([0.0, 4.0]))
    heads, tails = torch.rand(1, 2, 2, 2), torch.rand(1, 2, 2, 2)
    a, _ = m.transfer(heads, torch.tensor([0]), tails, torch.tensor([1]), vectors="official")
    b, _ = m.transfer(heads, torch.tensor([0]), tails, torch.tensor([1]), vectors="channel")
    assert not torch.allclose(a, b)


def test_gradcheck_float64():
    m = _module(channels=2, classes=3, k=2, dim=3, dtype=torch.float64)
    maps = torch.rand(5, 2, 2, 2, dtype=torch.float64)
    target = torch.tensor([0, 2, 2, 1, 2])
    mask = torch.tensor([True, False, False])
    call = torch.func.functional_call

    def run(params, **kw):
        return call(m, params, (maps, target), {"head_mask": mask, "transfer_strength": 1.0, **kw})

    names = ("linear", "bias", "centers")  # L_cesc (with the pair term) in the centre and assignment parameters
    args = tuple(getattr(m, n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(lambda *a: run(dict(zip(names, a)), contrastive=True, generate=False)[1], args)
    names = ("contrastive.0.weight", "contrastive.2.weight", "contrastive_fc.weight")
    args = tuple(m.get_parameter(n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(lambda *a: run(dict(zip(names, a)), contrastive=True, generate=False)[1], args)
    names = ("vec_transformation.weight", "vec_transformation.bias")  # L_mv and the new maps in T
    args = tuple(m.get_parameter(n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(lambda *a: run(dict(zip(names, a)), contrastive=False, generate=True)[2], args)
    assert torch.autograd.gradcheck(lambda *a: run(dict(zip(names, a)), contrastive=False, generate=True)[0], args)


def test_segments_pair_heads_and_tails():
    m = _module(channels=2, classes=4, k=2, dim=4)
    head_mask = torch.tensor([True, True, False, False])
    maps = torch.rand(7, 2, 2, 2)
    target = torch.tensor([0, 1, 0, 2, 0, 1, 3])  # 5 heads, 2 tails: int(5 / 2) = 2 segments
    out, cesc, mv, labels = m(maps, target, head_mask=head_mask, contrastive=False, generate=True)
    assert out.shape[0] == 7 + 4 and torch.equal(labels, torch.tensor([0, 1, 0, 2, 0, 1, 3, 2, 3, 2, 3]))
    assert torch.equal(out[:7], maps)
    # heads [0:2] then [2:4] with both tails each; L_mv is the mean of the two segments
    d = maps.detach()
    h, ht, t, tt = d[target < 2], target[target < 2], d[target >= 2], target[target >= 2]
    l0, n0 = m.transfer(h[0:2], ht[0:2], t, tt)
    l1, n1 = m.transfer(h[2:4], ht[2:4], t, tt)
    assert torch.allclose(mv, (l0 + l1) / 2) and torch.allclose(out[7:], torch.cat((n0, n1)))
    half, _, _, lab = m(maps, target, head_mask=head_mask, contrastive=False, generate=True, transfer_strength=0.4)
    assert half.shape[0] == 9 and lab.shape[0] == 9  # max(1, int(5 * 0.4 / 2)) = 1 segment
    few = torch.tensor([0, 2, 3, 2, 3, 2, 3])  # 1 head, 6 tails: 6 segments of one tail each
    assert m(maps, few, head_mask=head_mask, contrastive=False, generate=True)[0].shape[0] == 13
    only_heads = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    out, _, mv, labels = m(maps, only_heads, head_mask=head_mask, contrastive=False, generate=True)
    assert out.shape[0] == 7 and mv.item() == 0
    plain, cesc_c, mv_c, _ = m(maps, target, head_mask=head_mask, contrastive=True, generate=False)
    pair = F.cross_entropy(m.pair_logits(d[:3], d[3:6]), (target[:3] == target[3:6]).long())  # odd: last left out
    assert plain is maps and mv_c.item() == 0 and torch.allclose(cesc_c, cesc + pair)


def test_head_classes_by_count():
    assert head_classes([500, 300, 100, 50, 10], 0.4).tolist() == [0, 1]
    assert head_classes([10, 500, 10, 300], 0.5).tolist() == [1, 3]  # the largest, whatever the index
    assert head_classes([5, 5, 5, 5], 0.5).tolist() == [0, 1]  # ties: lower index


def test_step_loss_and_accuracy_rows():
    _, _, recipe = tiny_recipe(**{**RSG, "method.params": {"head_ratio": 0.5, "epoch_thresh": 0}})
    method, model = recipe.method, recipe.model.eval()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3])
    mask = method.head_mask(target.device)
    for epoch in (0, 1):  # contrastive phase, then generation
        method.on_epoch_start(epoch, recipe.loss)
        out = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
        maps = model.layer2(model.layer1(F.relu(model.bn1(model.conv1(images)))))
        new, cesc, mv, labels = model.rsg(maps, target, head_mask=mask, contrastive=epoch == 0, generate=epoch == 1)
        z = model.linear(model.layer3(new).mean((2, 3)))
        assert torch.allclose(out.loss, F.cross_entropy(z, labels) + 0.1 * cesc + 0.01 * mv, atol=1e-5)
        assert out.logits.shape == (4, 4) and torch.equal(out.target, target)  # accuracy on the real rows
        assert (labels.shape[0] > 4) == (epoch == 1)


def test_trains_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{**RSG, "method.params": {"head_ratio": 0.5, "epoch_thresh": 0}, "data.val_per_class": 2,
                                "loss.name": "ldam", "model.head": "cosine",
                                "reweight": {"scheme": "effective_number", "beta": 0.9999, "start_epoch": 1}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2 and any(k.startswith("rsg.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())
    assert (full / "eval.json").exists()


@pytest.mark.parametrize("over, key", [
    ({"method.params": {"head_ratio": 0.0}}, "head_ratio"),
    ({"method.params": {"head_ratio": 1.0}}, "head_ratio"),
    ({"method.params": {"head_ratio": 0.1}}, "head_ratio"),  # int(4 * 0.1) = 0 head classes
    ({"method.params": {"transfer_strength": 1.5}}, "transfer_strength"),
    ({"method.params": {"epoch_thresh": 2.5}}, "epoch_thresh"),
    ({"method.params": {"cesc_weight": -0.1}}, "cesc_weight"),
    ({"method.params": {"mv_weight": float("nan")}}, "mv_weight"),
    ({"method.params": {"vectors": "rows"}}, "vectors"),
    ({"model.params": {}}, "model.params.rsg"),
    ({"model.name": "small_cnn", "model.params": {"width": 4}}, "model.params.rsg"),
    ({"train.cutmix_alpha": 1.0}, "cutmix_alpha"),
])
def test_bad_params(over, key):
    with pytest.raises(ConfigError, match=key) as err:
        tiny_recipe(**{**RSG, **over})
    assert "\n" not in str(err.value) and "method 'rsg'" in str(err.value)


def test_bad_model_options():
    for params, msg in (({"rsg": "yes"}, "rsg must be true or false"), ({"rsg": True, "bbn": True}, "cannot be combined"),
                        ({"rsg": True, "rsg_centers": 0}, "rsg_centers"), ({"rsg": True, "rsg_dim": 2.5}, "rsg_dim")):
        with pytest.raises(ConfigError, match=msg) as err:
            tiny_recipe(**{"model.name": "resnet20", "model.params": params})
        assert "\n" not in str(err.value) and "model 'resnet20'" in str(err.value)
