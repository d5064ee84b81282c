"""DisAlign: the adaptive calibration head, the generalized re-weighting loss, the stage-2 method."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses import build_loss
from longtail.losses.grw import GRWLoss, grw_weights
from longtail.methods.disalign import DisAlign
from longtail.models.disalign_head import DisAlignHead
from longtail.models.heads import NormedLinear
from longtail.runmodel import load_run_model
from longtail.runs import train_run

COUNTS = [30, 10, 5, 1]


# -- generalized re-weighting loss
def test_grw_neutral_params_equal_cross_entropy():
    assert GRWLoss.neutral_params == {"rho": 0.0} and GRWLoss.rebalancing
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g)
    target = torch.randint(0, 4, (12,), generator=g)
    for reduction in ("weighted_mean", "mean"):
        loss = GRWLoss(class_counts=COUNTS, rho=0.0, reduction=reduction)
        assert torch.equal(loss.grw_weight, torch.ones(4))
        assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), atol=1e-7)


def test_grw_weights_by_hand():
    # counts (3, 1): r = (3/4, 1/4); rho = 1: 1/r = (4/3, 4), sum 16/3 -> x 2/(16/3): (0.5, 1.5)
    assert torch.allclose(grw_weights([3, 1], 1.0), torch.tensor([0.5, 1.5]))
    # rho = 2: (16/9, 16), sum 160/9 -> x 2 * 9/160: (0.2, 1.8)
    assert torch.allclose(grw_weights([3, 1], 2.0), torch.tensor([0.2, 1.8]))
    w = grw_weights(COUNTS, 1.2)
    assert math.isclose(float(w.sum()), 4.0, rel_tol=1e-6)
    assert math.isclose(float(w[3] / w[0]), 30 ** 1.2, rel_tol=1e-5)
    # a class without training images gets weight 0 (never a target), not inf
    assert torch.allclose(grw_weights([3, 0, 1], 1.0), torch.tensor([0.75, 0.0, 2.25]))


def test_grw_loss_by_hand_and_as_official():
    # counts (3, 1), rho = 1: w = (0.5, 1.5). logits (0, 0) for both -> CE_i = log 2 each
    loss = GRWLoss(class_counts=[3, 1], rho=1.0)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([0, 1])
    ce0, ce1 = math.log(2.0), math.log(4.0)  # second: softmax (3/4, 1/4), target 1
    expected = (0.5 * ce0 + 1.5 * ce1) / (0.5 + 1.5)
    assert math.isclose(float(loss(logits, target)), expected, rel_tol=1e-6)
    paper = GRWLoss(class_counts=[3, 1], rho=1.0, reduction="mean")
    assert math.isclose(float(paper(logits, target)), (0.5 * ce0 + 1.5 * ce1) / 2, rel_tol=1e-6)
    # the official GRWCrossEntropyLoss: F.cross_entropy with weight = w, default 'mean' reduction
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 4, generator=g)
    target = torch.randint(0, 4, (9,), generator=g)
    loss = GRWLoss(class_counts=COUNTS, rho=1.2)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target, weight=grw_weights(COUNTS, 1.2)))
    # a re-weighting schedule's class weight multiplies the G-RW weight
    extra = torch.tensor([1.0, 2.0, 1.0, 0.5])
    loss.set_class_weight(extra)
    assert torch.allclose(loss(logits, target),
                          F.cross_entropy(logits, target, weight=grw_weights(COUNTS, 1.2) * extra))


@pytest.mark.parametrize("reduction", ["weighted_mean", "mean"])
def test_grw_gradcheck(reduction):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 3, 1])
    loss = GRWLoss(class_counts=COUNTS, rho=1.2, reduction=reduction).double()
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


@pytest.mark.parametrize("params, match", [
    ({"rho": -0.1}, "rho must be a finite number >= 0"),
    ({"rho": "big"}, "rho must be"),
    ({"rho": True}, "rho must be"),
    ({"reduction": "sum"}, "reduction must be one of 'weighted_mean', 'mean'"),
])
def test_grw_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        build_loss("grw", params, class_counts=COUNTS)


def test_grw_bad_parameter_is_a_one_line_config_error(tmp_path):
    cfg = config_from_dict(tiny_config(**{"loss.name": "grw", "loss.params": {"rho": -1}}))
    with pytest.raises(ConfigError, match=r"^loss 'grw': rho must be") as err:
        train_run(cfg, tmp_path / "x", arrays=tiny_arrays())
    assert "\n" not in str(err.value)


# -- calibration head
def _linear(d=3, c=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_head_with_zero_scale_and_bias_gives_the_stage1_logits_exactly(kind):
    base = _linear() if kind == "linear" else NormedLinear(in_features=3, num_classes=4)
    head = DisAlignHead(base, in_features=3, num_classes=4)
    with torch.no_grad():
        head.logit_scale.zero_()
        head.confidence.bias.fill_(0.7)
    feats = torch.randn(5, 3)
    assert torch.equal(head(feats), base(feats))
    assert torch.equal(DisAlignHead(base, in_features=3, num_classes=4, scale_init=0.0)(feats), base(feats))


def test_head_official_initialisation_and_frozen_base():
    base = _linear()
    head = DisAlignHead(base, in_features=3, num_classes=4)
    assert torch.equal(head.logit_scale, torch.ones(4)) and torch.equal(head.logit_bias, torch.zeros(4))
    assert torch.equal(head.confidence.weight, torch.full((1, 3), 0.1))
    assert not any(p.requires_grad for p in head.base.parameters())
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        "logit_scale", "logit_bias", "confidence.weight", "confidence.bias"}
    feats = torch.randn(5, 3)
    sigma = torch.sigmoid(head.confidence(feats))
    assert torch.allclose(head(feats), (1 + sigma) * base(feats))  # alpha = 1: (1 + sigma) z, same argmax


def test_head_by_hand():
    # D = 2, C = 2: W = I, b = 0 -> z = x; v = (1, -1), b_v = 0; x = (1, 1): sigma = 1/2
    base = nn.Linear(2, 2)
    head = DisAlignHead(base, in_features=2, num_classes=2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.zero_()
        head.confidence.weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.confidence.bias.zero_()
        head.logit_scale.copy_(torch.tensor([2.0, -1.0]))
        head.logit_bias.copy_(torch.tensor([0.5, 4.0]))
    out = head(torch.tensor([[1.0, 1.0]]))
    # class 0: (1 + 0.5 * 2) * 1 + 0.5 * 0.5 = 2.25; class 1: (1 - 0.5) * 1 + 0.5 * 4 = 2.5
    assert torch.allclose(out, torch.tensor([[2.25, 2.5]]))


def test_head_gradcheck():
    torch.manual_seed(3)
    head = DisAlignHead(nn.Linear(3, 4), in_features=3, num_classes=4).double()
    feats = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0])
    loss = GRWLoss(class_counts=COUNTS, rho=1.2).double()
    params = (head.logit_scale, head.logit_bias, head.confidence.weight, head.confidence.bias)

    def f(x, alpha, beta, v, b):
        z = head.base(x)
        sigma = torch.sigmoid(x @ v.t() + b)
        return loss((1 + sigma * alpha) * z + sigma * beta, target)

    assert torch.allclose(f(feats, *params), loss(head(feats), target))
    assert torch.autograd.gradcheck(f, (feats, *(p.detach().clone().requires_grad_(True) for p in params)))


# -- the stage-2 method
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("disalign_stage1")
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce" / "checkpoints" / "last.pt"


def _config(stage1, **over):
    return tiny_config(**{"method.name": "disalign", "method.params": {"stage1": str(stage1)},
                          "loss.name": "grw", "loss.params": {"rho": 1.2}, "train.lr_schedule": "cosine",
                          "train.warmup_epochs": 0, **over})


def test_disalign_trains_only_the_calibration_and_rebuilds_without_stage1(tmp_path, stage1):
    train_run(config_from_dict(_config(stage1)), tmp_path / "da", arrays=tiny_arrays())
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "da/checkpoints/last.pt")["model"]
    for k, v in before.items():
        if k.startswith("fc."):  # the stage-1 classifier, now inside the head, unchanged
            assert torch.equal(v, after[k.replace("fc.", "fc.base.", 1)]), k
        elif "running_" not in k and "num_batches" not in k:  # frozen backbone weights
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])  # BN re-estimated
    assert not torch.equal(after["fc.logit_scale"], torch.ones(4))
    assert not torch.equal(after["fc.logit_bias"], torch.zeros(4))
    # the run's network rebuilds from its own folder, the stage-1 file gone; evaluation uses the head
    stage1.rename(tmp_path / "gone.pt")
    try:
        model, epoch, _ = load_run_model(tmp_path / "da")
    finally:
        (tmp_path / "gone.pt").rename(stage1)
    assert isinstance(model.fc, DisAlignHead) and epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), after.values()))


def test_disalign_keeps_bn_statistics_when_asked(tmp_path, stage1):
    cfg = _config(stage1, **{"method.params": {"stage1": str(stage1), "retrain_bn_stats": False},
                             "train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "da", arrays=tiny_arrays(), evaluate=False)
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "da/checkpoints/last.pt")["model"]
    assert torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])


def test_disalign_resumes_exactly(tmp_path, monkeypatch, stage1):
    full, cut, _ = full_and_resumed(_config(stage1), tmp_path, monkeypatch, stop_after_epoch=0,
                                    arrays=tiny_arrays(), evaluate=False)
    a = safe_torch_load(full / "checkpoints/last.pt")
    b = safe_torch_load(cut / "checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_disalign_is_a_rebalancing_stage2_method():
    assert DisAlign.rebalancing and DisAlign.stage == 2 and DisAlign.trains


@pytest.mark.parametrize("params, match", [
    ({}, "needs method.params.stage1"),
    ({"stage1": "S", "scale_init": "one"}, "scale_init must be a finite number"),
    ({"stage1": "S", "confidence_init": float("nan")}, "confidence_init must be a finite number"),
    ({"stage1": "S", "retrain_bn_stats": "yes"}, "retrain_bn_stats must be true or false"),
])
def test_disalign_bad_parameters(tmp_path, stage1, params, match):
    params = {k: (str(stage1) if v == "S" else v) for k, v in params.items()}
    cfg = config_from_dict(tiny_config(**{"method.name": "disalign", "method.params": params}))
    with pytest.raises(ConfigError, match=match) as err:
        train_run(cfg, tmp_path / "x", arrays=tiny_arrays())
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
