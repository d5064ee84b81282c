"""OLTR: modulated attention, meta-embedding head, discriminative centroid loss, the stage-2 method."""

import math

import pytest
import torch

from conftest import full_and_resumed, last_checkpoints, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses.disc_centroids import attract_loss, disc_centroids_loss, repel_loss
from longtail.methods.oltr import OLTR
from longtail.models.oltr import CosNormClassifier, MetaEmbeddingHead, ModulatedAttention, OLTRNetwork
from longtail.runmodel import load_run_model
from longtail.runs import train_run


# -- discriminative centroid loss
def test_centroid_loss_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    # attract: (|f0 - c0|^2 + |f1 - c1|^2) / 2 / B = (1 + 1) / 4 = 0.5
    assert math.isclose(float(attract_loss(f, y, c)), 0.5)
    # negatives: |f0 - c1|^2 = 2, |f1 - c0|^2 = 4 -> sum 6 / (B C = 4) = 1.5 -> repel = 10 - 1.5
    assert math.isclose(float(repel_loss(f, y, c)), 8.5)
    assert math.isclose(float(disc_centroids_loss(f, y, c)), 0.5 + 0.01 * 8.5, rel_tol=1e-6)
    assert math.isclose(float(repel_loss(f, y, c, margin=1.0)), 0.0)  # clamped at 0
    assert math.isclose(float(disc_centroids_loss(f, y, c, repel_weight=0.0)), 0.5)


def test_official_centroid_gradient_is_the_centre_loss_update_unscaled():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    c = torch.zeros(3, 2, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    (0.01 * attract_loss(f, y, c)).backward()
    # features: true gradient x 0.01: (f - c_y) / B * 0.01
    assert torch.allclose(f.grad, 0.01 * f.detach() / 3)
    # centroids: sum (c - f) / (1 + n_k) / B, not scaled by 0.01; class 2 has no sample
    expected = torch.tensor([[-4.0 / 3 / 3, 0.0], [0.0, -2.0 / 2 / 3], [0.0, 0.0]])
    assert torch.allclose(c.grad, expected)


def test_centroid_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    big = dict(margin=50.0)  # inside the clamp, so the repelling term has a gradient
    assert torch.autograd.gradcheck(lambda a, b: disc_centroids_loss(a, y, b, centroid_grad="autograd", **big), (f, c))
    # the official function: the true gradient for the features
    assert torch.autograd.gradcheck(lambda a: disc_centroids_loss(a, y, c.detach(), **big), (f,))


# -- network pieces
def test_modulated_attention_is_the_identity_at_init_and_has_its_shape():
    torch.manual_seed(0)
    att = ModulatedAttention(6, (3, 4))
    x = torch.randn(2, 6, 3, 4)
    assert torch.equal(att(x), x)  # conv_mask starts at zero (official init)
    assert att.inter_channels == 3 and att.fc_spatial.weight.shape == (12, 72)
    with pytest.raises(ValueError, match="built for"):
        att(torch.randn(2, 6, 4, 4))


def test_modulated_attention_by_formula_and_gradcheck():
    torch.manual_seed(1)
    att = ModulatedAttention(4, (2, 2)).double()
    torch.nn.init.normal_(att.conv_mask.weight)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    b = x.shape[0]
    g = att.g(x).flatten(2)  # (B, C', hw)
    th = att.theta(x).flatten(2)
    ph = att.phi(x).flatten(2)
    a = torch.softmax(torch.einsum("bcp,bcq->bpq", th, ph), dim=-1)  # (B, hw, hw)
    y = torch.einsum("bpq,bcq->bcp", a, g).reshape(b, 2, 2, 2)
    s = torch.softmax(x.reshape(b, -1) @ att.fc_spatial.weight.t() + att.fc_spatial.bias, dim=1).view(b, 1, 2, 2)
    assert torch.allclose(att(x), s * att.conv_mask(y) + x)
    assert torch.autograd.gradcheck(att, (x,))


def test_cosnorm_by_hand():
    cls = CosNormClassifier(2, 2)
    with torch.no_grad():
        cls.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    # x = (3, 4): |x| = 5 -> squash 5/6 * (0.6, 0.8); w rows (1, 0), (0, -1)
    out = cls(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(out, 16 * 5 / 6 * torch.tensor([[0.6, -0.8]]))


def test_meta_embedding_by_hand():
    head = MetaEmbeddingHead(2, 2)
    with torch.no_grad():
        head.centroids.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
        head.hallucinator.weight.zero_()
        head.hallucinator.bias.zero_()  # o = (1/2, 1/2): v_mem = (2, 0)
        head.selector.weight.zero_()
        head.selector.bias.fill_(0.5)  # e = tanh(0.5)
    x = torch.tensor([[1.0, 0.0]])  # nearest centroid at distance 1 -> gamma = 10
    e = math.tanh(0.5)
    expected = 10 * torch.tensor([[1.0 + 2 * e, 0.0 + 0 * e]])
    assert torch.allclose(head.meta_embedding(x), expected)
    assert torch.allclose(head(x), head.cosnorm(expected))
    # neutral: selector at zero -> gamma x, and the cosine score of gamma x
    with torch.no_grad():
        head.selector.bias.zero_()
    assert torch.allclose(head.meta_embedding(x), 10 * x)


def test_meta_embedding_gradcheck_and_memory_detached():
    torch.manual_seed(2)
    head = MetaEmbeddingHead(3, 4).double()
    with torch.no_grad():
        head.centroids.normal_()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (x,))
    head(x).sum().backward()
    assert head.centroids.grad is None  # the head reads the memory detached (official centroids.data)


def test_network_shapes_and_plain_backbone_unchanged():
    from longtail.models import build_model
    torch.manual_seed(0)
    backbone = build_model("resnet32", num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    backbone.eval()
    ref = backbone.forward_features(images)
    net = OLTRNetwork(backbone, num_classes=10, map_size=(8, 8), fc_dim=64).eval()
    assert torch.equal(net.forward_features(images), ref)  # attention starts as the identity
    assert net.forward_head(ref, pre_logits=True).shape == (2, 64) and net(images).shape == (2, 10)
    assert (net.forward_head(ref, pre_logits=True) >= 0).all()  # fc_add + ReLU


# -- the stage-2 method
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("oltr_stage1")
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce" / "checkpoints" / "last.pt"


def _config(stage1, params=None, **over):
    return tiny_config(**{"method.name": "oltr", "method.params": {"stage1": str(stage1), **(params or {})},
                          "sampler.name": "class_aware", **over})


def test_oltr_builds_from_stage1_and_initialises_the_memory(stage1):
    from conftest import tiny_recipe
    cfg, data, recipe = tiny_recipe(**_config(stage1))
    model, before = recipe.model, safe_torch_load(stage1)["model"]
    assert isinstance(model, OLTRNetwork) and model.attention.map_size == (4, 4)
    assert torch.equal(model.fc.hallucinator.weight, before["fc.weight"])
    assert torch.equal(model.fc.hallucinator.bias, before["fc.bias"])
    assert torch.equal(model.backbone.features[0].weight, before["features.0.weight"])
    names = [g.name for g in recipe.param_groups]
    assert names == ["features", "classifier", "centroids"]
    assert [g.lr_scale for g in recipe.param_groups] == [0.1, 1.0, 0.1]
    n = sum(p.numel() for g in recipe.param_groups for p in g.params)
    assert n == sum(p.numel() for p in model.parameters())
    # memory: the per-class mean direct features of the un-augmented training images
    method = recipe.method
    method.update_centroids(model, "cpu")
    assert bool(model.fc.centroids_ready) and model.training  # back in train mode
    from longtail.eval.predict import predict
    out = predict(model, data.train, mean=data.mean, std=data.std, features=True)
    feats, labels = torch.from_numpy(out["features"]), torch.from_numpy(out["labels"])
    for c in range(4):
        assert torch.allclose(model.fc.centroids[c], feats[labels == c].mean(0), atol=1e-5)


def test_oltr_freeze_backbone_trains_attention_and_fc_add_only(tmp_path, stage1):
    cfg = _config(stage1, {"freeze_backbone": True}, **{"train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "o", arrays=tiny_arrays(), evaluate=False)
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "o/checkpoints/last.pt")["model"]
    for k, v in before.items():
        if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, after["backbone." + k]), k
    assert not torch.equal(after["attention.conv_mask.weight"], torch.zeros_like(after["attention.conv_mask.weight"]))


def test_oltr_resumes_exactly_and_rebuilds_without_stage1(tmp_path, monkeypatch, stage1):
    full, cut, _ = full_and_resumed(_config(stage1), tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert bool(a["model"]["fc.centroids_ready"])
    stage1.rename(tmp_path / "gone.pt")
    try:
        model, epoch, _ = load_run_model(full)
    finally:
        (tmp_path / "gone.pt").rename(stage1)
    assert isinstance(model, OLTRNetwork) and epoch == 2
    assert all(torch.equal(x, a["model"][k]) for k, x in model.state_dict().items())


def test_oltr_is_a_rebalancing_stage2_method():
    assert OLTR.rebalancing and OLTR.stage == 2 and OLTR.trains


@pytest.mark.parametrize("params, match", [
    ({}, "needs method.params.stage1"),
    ({"stage1": "S", "feature_weight": -1}, "feature_weight must be a finite number >= 0"),
    ({"stage1": "S", "margin": "ten"}, "margin must be"),
    ({"stage1": "S", "centroid_grad": "exact"}, "centroid_grad must be one of 'official', 'autograd'"),
    ({"stage1": "S", "reachability_scale": 0}, "reachability_scale must be a finite number > 0"),
    ({"stage1": "S", "attention": "yes"}, "attention must be true or false"),
    ({"stage1": "S", "fc_dim": 0}, "fc_dim must be a positive integer"),
    ({"stage1": "S", "fc_dim": 5}, "needs fc_dim = the backbone's 8 features"),
    ({"stage1": "S", "hallucinator_init": "zeros"}, "hallucinator_init must be one of"),
    ({"stage1": "S", "centroid_lr_scale": 0}, "centroid_lr_scale must be a finite number > 0"),
])
def test_oltr_bad_parameters(tmp_path, stage1, params, match):
    params = {k: (str(stage1) if v == "S" else v) for k, v in params.items()}
    cfg = config_from_dict(tiny_config(**{"method.name": "oltr", "method.params": params}))
    with pytest.raises(ConfigError, match=match) as err:
        train_run(cfg, tmp_path / "x", arrays=tiny_arrays())
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_oltr_refuses_batch_mixing(tmp_path, stage1, key):
    # OLTR's own training_step never calls the base step, where mixup / CutMix happen: refused, not ignored
    cfg = config_from_dict(tiny_config(**{"method.name": "oltr", "method.params": {"stage1": str(stage1)},
                                          f"train.{key}": 1.0}))
    with pytest.raises(ConfigError, match=f"method 'oltr' does not take the loop's mixup / CutMix .*; "
                                          f"set train.{key}: 0$") as err:
        train_run(cfg, tmp_path / "x", arrays=tiny_arrays())
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
