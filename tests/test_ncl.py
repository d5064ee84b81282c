"""NCL (losses/ncl.py, methods/ncl.py, `experts.shared_stages: none`): hard category mining, NIL and NBOD
by hand on tiny tensors, neutral settings equal balanced softmax / CE, float64 gradcheck, the independent
expert networks, the step against the network's expert logits, a 2-epoch tiny run that resumes exactly,
bad parameters, the three configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import check_expert_step, full_and_resumed, last_checkpoints, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.losses.ncl import NCLLoss, hard_category_mask, nbod
from longtail.models import build_model

COUNTS = [9, 4, 2, 1]
EXPERTS = {"num": 2, "shared_stages": "none"}
NCL_CFG = {"method.name": "ncl", "model.name": "resnet20", "model.params": {"experts": EXPERTS},
           "loss.name": "ncl", "loss.params": {"hard_classes": 2}}

# (E=3, B=2, C=4), no ties within a row
Z = [[[3.0, 1.0, 2.0, 0.0], [0.5, 4.0, -1.0, 2.0]],
     [[1.5, -0.5, 0.25, 1.0], [-2.0, 1.0, 0.75, 0.1]],
     [[0.3, 0.9, -1.2, 2.2], [1.1, -0.4, 0.6, -0.7]]]
Y = [3, 0]


def test_hard_category_mining_by_hand():
    z, y = torch.tensor(Z[0]), torch.tensor(Y)
    # row 0: target 3 + the highest non-target logit (class 0: 3.0); row 1: target 0 + class 1 (4.0)
    assert hard_category_mask(z, y, 2).tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]
    assert hard_category_mask(z, y, 3).tolist() == [[1, 0, 1, 1], [1, 1, 0, 1]]
    assert hard_category_mask(z, y, 1).tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]  # the target only
    assert hard_category_mask(z, y, 30).tolist() == [[1] * 4, [1] * 4]  # k >= C: every class
    # the target is always in, even when it has the lowest logit
    assert hard_category_mask(torch.tensor([[5.0, 4.0, 3.0, -9.0]]), torch.tensor([3]), 2).tolist() == [[1, 0, 0, 1]]


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _hand(z, y, counts, *, k, ce_w, hcm_w, lam, lam_h, mode="zero"):
    """The official NIL_NBOD written out with numpy, one sample and class at a time."""
    z = np.asarray(z, dtype=np.float64)
    n_exp, b, c = z.shape
    log_n = np.log(np.asarray(counts, dtype=np.float64) + 1e-6)
    masks = []
    for i in range(b):
        others = sorted((j for j in range(c) if j != y[i]), key=lambda j: -z[0, i, j])[:k - 1]
        masks.append({y[i], *others})
    bal = z + log_n
    hard = np.empty_like(bal)
    for e in range(n_exp):
        for i in range(b):
            for j in range(c):
                inside = j in masks[i]
                hard[e, i, j] = bal[e, i, j] if inside else (0.0 if mode == "zero" else -np.inf)

    def ce(logits):
        return np.mean([-math.log(_softmax(logits[i])[y[i]]) for i in range(b)])

    def kl_sum(logits):
        total = 0.0
        for s in range(n_exp):
            for t in range(n_exp):
                if s == t:
                    continue
                for i in range(b):
                    p_t, p_s = _softmax(logits[t, i]), _softmax(logits[s, i])
                    for j in range(c):
                        if p_t[j] > 0:
                            total += p_t[j] * (math.log(p_t[j]) - math.log(p_s[j] + 1e-9)) / b
        return total / (n_exp - 1) if n_exp > 1 else 0.0

    nil = sum(ce_w * ce(bal[e]) + hcm_w * ce(hard[e]) for e in range(n_exp))
    return nil + lam * kl_sum(bal) + lam_h * kl_sum(hard)


@pytest.mark.parametrize("mode", ["zero", "exclude"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_nil_and_nbod_by_hand(mode, k):
    loss = NCLLoss(class_counts=COUNTS, hard_classes=k, ce_weight=1.0, hcm_weight=0.7, distill_weight=0.6,
                   distill_hard_weight=0.4, hard_mask=mode).double()
    z, y = torch.tensor(Z, dtype=torch.float64), torch.tensor(Y)
    expected = _hand(Z, Y, COUNTS, k=k, ce_w=1.0, hcm_w=0.7, lam=0.6, lam_h=0.4, mode=mode)
    assert float(loss(z, y)) == pytest.approx(expected, rel=1e-6)  # log(n + eps) is a float32 buffer


def test_nbod_by_hand_two_experts():
    a = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
    p, q = F.softmax(a, 1)[0].numpy(), F.softmax(b, 1)[0].numpy()
    kl_qp = sum(q[j] * (math.log(q[j]) - math.log(p[j] + 1e-9)) for j in range(3))  # KL(q || p)
    kl_pq = sum(p[j] * (math.log(p[j]) - math.log(q[j] + 1e-9)) for j in range(3))
    assert float(nbod([a, b], 0.6)) == pytest.approx(0.6 * (kl_qp + kl_pq) / 1, rel=1e-12)
    assert nbod([a], 0.6) == 0.0
    three = nbod([a, b, a], 1.0)  # / (E - 1) = 2; the (a, a) pairs give 0 up to the 1e-9
    assert float(three) == pytest.approx((2 * kl_qp + 2 * kl_pq) / 2, rel=1e-7)


def test_neutral_settings():
    logits, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    bs = build_loss("balanced_softmax", {}, class_counts=COUNTS).double()
    one = NCLLoss(class_counts=COUNTS, hcm_weight=0.0).double()  # one expert (B, C): NBOD is 0
    torch.testing.assert_close(one(logits, y), bs(logits, y))
    torch.testing.assert_close(one(logits[None], y), bs(logits, y))
    # no distillation, no hard classes: every expert is trained by balanced softmax on its own
    experts = torch.randn(3, 6, 4, dtype=torch.float64)
    plain = NCLLoss(class_counts=COUNTS, hcm_weight=0.0, distill_weight=0.0, distill_hard_weight=0.0).double()
    torch.testing.assert_close(plain(experts, y), sum(bs(e, y) for e in experts))
    # equal counts: cross-entropy; balanced: false is CE with any counts
    equal = NCLLoss(class_counts=[5, 5, 5, 5], hcm_weight=0.0).double()
    torch.testing.assert_close(equal(logits, y), F.cross_entropy(logits, y))
    unbalanced = NCLLoss(class_counts=COUNTS, hcm_weight=0.0, balanced=False).double()
    torch.testing.assert_close(unbalanced(logits, y), F.cross_entropy(logits, y))
    # hard classes = C and the official zero mask: the hard terms repeat the full ones
    full = NCLLoss(class_counts=COUNTS, hard_classes=4).double()
    base = NCLLoss(class_counts=COUNTS, hcm_weight=0.0, distill_hard_weight=0.0).double()
    torch.testing.assert_close(full(experts, y), 2 * base(experts, y))


def test_gradcheck_float64():
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(Y)
    assert torch.autograd.gradcheck(lambda a: nbod(list(a), 0.6), (z,))
    for mode in ("zero", "exclude"):
        loss = NCLLoss(class_counts=COUNTS, hard_classes=2, hard_mask=mode).double()
        assert torch.autograd.gradcheck(lambda a: loss(a, y), (z,))
    loss.set_class_weight(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (z,))


def test_distillation_matches_the_official_form_and_keeps_the_teacher_gradient():
    a = torch.tensor([[1.0, 0.0, -1.0], [0.3, 0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    official = 0.6 * (F.kl_div(torch.log(pa + 1e-9), pb, reduction="batchmean")
                      + F.kl_div(torch.log(pb + 1e-9), pa, reduction="batchmean"))
    ours = nbod([a, b], 0.6)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (a, b))
    g_official = torch.autograd.grad(official, (a, b), retain_graph=True)
    for x, y in zip(g_ours, g_official):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # a detached teacher (RIDE-style) would give another gradient: NBOD pulls both experts of a pair
    detached = 0.6 * (F.kl_div(torch.log(pa + 1e-9), pb.detach(), reduction="batchmean")
                      + F.kl_div(torch.log(pb + 1e-9), pa.detach(), reduction="batchmean"))
    assert not torch.allclose(torch.autograd.grad(detached, a)[0], g_ours[0])


def test_distillation_gradient_is_finite_where_a_probability_underflows():
    a = torch.tensor([[200.0, 0.0, -10.0]], requires_grad=True)  # float32: softmax(a)[2] == 0
    b = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    assert F.softmax(a, 1)[0, 2] == 0
    nbod([a, b], 0.6).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_independent_expert_networks():
    torch.manual_seed(0)
    plain = build_model("resnet32", num_classes=7).double().eval()
    torch.manual_seed(0)
    single = build_model("resnet32", num_classes=7, params={"experts": {"num": 1, "shared_stages": "none"}})
    single = single.double().eval()
    rename = {"conv1s.0.": "conv1.", "bn1s.0.": "bn1.", "linears.0.": "linear.", "layer1s.0.": "layer1.",
              "layer2s.0.": "layer2.", "layer3s.0.": "layer3."}
    p_state, s_state = plain.state_dict(), single.state_dict()
    assert len(p_state) == len(s_state)
    for key, value in s_state.items():
        old = next(o for n, o in rename.items() if key.startswith(n)) + key.split(".", 2)[2]
        assert torch.equal(p_state[old], value), key  # same init draws, same order
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(plain(images), single(images))
    three = build_model("resnet32", num_classes=10, params={"experts": {"num": 3, "shared_stages": "none"}})
    assert sum(p.numel() for p in three.parameters()) == 3 * 464_154 == 1_392_462
    names = three.state_dict()
    assert "conv1.weight" not in names and names["conv1s.2.weight"].shape == (16, 3, 3, 3)
    assert names["layer1s.1.0.conv1.weight"].shape == (16, 16, 3, 3) and "linears.2.bias" in names
    three = three.double().eval()
    assert torch.equal(three.shared_features(images), images)
    logits, feats = three.expert_outputs(images)
    assert logits.shape == (3, 3, 10) and feats.shape == (3, 3, 64)
    torch.testing.assert_close(three(images), logits.mean(0))
    for e in range(3):  # each expert is a whole ResNet-32 of its own
        maps = three.expert_branch(images, e)
        torch.testing.assert_close(three.expert_head(e, maps.mean(dim=(2, 3))), logits[e])
    narrow = build_model("resnet20", num_classes=5, params={"experts": {"num": 2, "shared_stages": "none",
                                                                        "widths": "ride"}})
    assert narrow.conv1s[0].out_channels == 12 and narrow.layer3s[1][0].conv1.out_channels == 48


@pytest.mark.parametrize("name,experts,match", [
    ("resnet10", {"num": 2, "shared_stages": "none"}, "experts.shared_stages"),  # ImageNet nets: not offered
    ("resnet32", {"num": 2, "shared_stages": "all"}, "'none'"),
    ("resnet32", {"num": 2, "shared_stages": None}, "experts.shared_stages"),
])
def test_bad_independent_params(name, experts, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, num_classes=10, params={"experts": experts})


def test_step_is_the_loss_of_the_expert_logits():
    _, _, recipe = tiny_recipe(**NCL_CFG)
    model, loss = recipe.model, recipe.loss
    assert model.num_experts == 2 and model.expert_spec.independent and loss.hard_classes == 2
    check_expert_step(**NCL_CFG)


def test_tiny_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**NCL_CFG)
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert any(k.startswith("conv1s.1.") for k in a["model"])


@pytest.mark.parametrize("over,match", [
    ({"model.params": {}}, "model.params.experts"),
    ({"loss.name": "balanced_softmax", "loss.params": {}}, "'ncl' loss"),
    ({"train.mixup_alpha": 0.2}, "mixup_alpha"),
    ({"loss.params": {"hard_classes": 0}}, "hard_classes"),
    ({"loss.params": {"hard_mask": "drop"}}, "hard_mask"),
    ({"loss.params": {"balanced": "yes"}}, "balanced"),
    ({"loss.params": {"distill_weight": -0.6}}, "distill_weight"),
    ({"loss.params": {"hcm_weight": float("nan")}}, "hcm_weight"),
    ({"model.params": {"experts": {"num": 2, "shared_stages": "nope"}}}, "experts.shared_stages"),
])
def test_bad_params(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_recipe(**{**NCL_CFG, **over})
    assert "\n" not in str(err.value)


def test_loss_rejects_bad_shapes():
    loss = build_loss("ncl", {}, class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"\(E, B, C\)"):
        loss(torch.zeros(1, 2, 3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\(E, B, C\)"):
        loss(torch.zeros(2, 5, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("folder", ["cifar10_lt", "cifar10_lt_full", "cifar100_lt"])
def test_configs_build_the_official_recipe(folder):
    from pathlib import Path

    from longtail.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / folder / "ncl.yaml"
    assert path.read_text().splitlines()[0] == f"# longtail train configs/{folder}/ncl.yaml --out runs/{folder}_ncl"
    cfg = load_config(path)
    assert cfg.method.name == "ncl" and cfg.loss.name == "ncl" and cfg.model.name == "resnet32"
    assert cfg.train.weight_decay == 0.0002 and cfg.train.nesterov and cfg.train.lr == 0.1
    assert cfg.train.augment.policy == "autoaugment" and cfg.train.augment.cutout == 16
    full = folder.endswith("full")
    assert cfg.train.epochs == (400 if full else 30) and cfg.train.lr_decay == 0.1
    assert cfg.train.milestones == ([319, 359] if full else [24, 27])
    assert cfg.train.batch_size == (64 if full else 128)
    model = build_model(cfg.model.name, num_classes=10, head=cfg.model.head, params=cfg.model.params)
    assert model.num_experts == 3 and model.expert_spec.independent
    loss = build_loss(cfg.loss.name, cfg.loss.params, class_counts=[500, 50, 5, 5, 5, 5, 5, 5, 5, 5])
    assert (loss.hard_classes, loss.distill_weight, loss.distill_hard_weight) == (30, 0.6, 0.6)
    assert (loss.ce_weight, loss.hcm_weight, loss.hard_mask, loss.balanced) == (1.0, 1.0, "zero", True)
