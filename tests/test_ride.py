"""RIDE (losses/ride.py, methods/ride.py): the loss by hand on a tiny example before and during DRW,
neutral settings equal CE / LDAM, float64 gradcheck of the diversity term and of the loss, the step
against the network's expert logits, a 2-epoch tiny run that resumes exactly, bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import check_expert_step, full_and_resumed, last_checkpoints, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.losses import build_loss, effective_number_weights
from longtail.losses.ldam import LDAMLoss
from longtail.losses.ride import RIDELoss, diversity_kl, ride_diversity_weights

COUNTS = [9, 3, 1]
EXPERTS = {"num": 2, "shared_stages": 1, "widths": "ride", "scale": 30.0}
RIDE_CFG = {"method.name": "ride", "model.name": "resnet20", "model.head": "cosine",
            "model.params": {"experts": EXPERTS}, "loss.name": "ride",
            "loss.params": {"additional_diversity_factor": -0.45}}


def _hand(z, y, counts, *, max_m, s, factor, t0, drw_weight=None, rf=0.05):
    """RIDELoss written out with numpy, one sample and class at a time."""
    z = np.asarray(z, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    m = n ** -0.25
    m = m * max_m / m.max()
    mean = z.mean(axis=0)
    if drw_weight is None:
        t = np.full(len(n), t0)
    else:
        w = len(n) * (n / n.sum()) * rf + 1 - rf
        t = t0 * w / w.max()
    total = 0.0
    for ze in z:
        num = den = 0.0
        for i, yi in enumerate(y):
            row = ze[i].copy()
            row[yi] -= s * m[yi]
            ce = -(row[yi] - math.log(np.exp(row).sum()))
            wi = 1.0 if drw_weight is None else drw_weight[yi]
            num += wi * ce
            den += wi
        total += num / den
        kl = 0.0
        for i in range(len(y)):
            p = np.exp(mean[i] / t) / np.exp(mean[i] / t).sum()
            q = np.exp(ze[i] / t) / np.exp(ze[i] / t).sum()
            kl += (p * (np.log(p) - np.log(q))).sum()
        total += factor * t.mean() ** 2 * kl / len(y)
    return total


Z = [[[3.0, -1.0, 0.5], [0.2, 2.0, -4.0]], [[1.0, 0.0, -2.0], [-1.5, 0.7, 2.5]]]  # (E=2, B=2, C=3)
Y = [0, 2]


def test_loss_by_hand_before_and_during_drw():
    loss = RIDELoss(class_counts=COUNTS, max_m=0.5, s=30.0, additional_diversity_factor=-0.2,
                    base_diversity_temperature=1.5)
    z, y = torch.tensor(Z, dtype=torch.float64), torch.tensor(Y)
    expected = _hand(Z, Y, COUNTS, max_m=0.5, s=30.0, factor=-0.2, t0=1.5)
    assert float(loss(z, y)) == pytest.approx(expected, rel=1e-7)  # margins are float32 (as LDAM)
    w = effective_number_weights(COUNTS, 0.9999)
    loss.set_class_weight(w)  # DRW: class weights and per-class diversity temperatures together
    expected = _hand(Z, Y, COUNTS, max_m=0.5, s=30.0, factor=-0.2, t0=1.5, drw_weight=w.double().numpy())
    assert float(loss(z, y)) == pytest.approx(expected, rel=1e-6)  # the weights are float32


def test_diversity_weights_by_hand():
    # p = [9, 3, 1] / 13; w = 3 p 0.05 + 0.95, over its max
    p = np.array([9, 3, 1]) / 13
    w = 3 * p * 0.05 + 0.95
    assert np.allclose(ride_diversity_weights(COUNTS, 0.05).numpy(), w / w.max())
    with pytest.raises(ValueError, match="reweight_factor"):
        ride_diversity_weights([1000, 0], 1.0)  # an empty class with f = 1: T_c = 0


def test_neutral_settings():
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1])
    neutral = RIDELoss(class_counts=COUNTS, **RIDELoss.neutral_params)
    torch.testing.assert_close(neutral(logits, y), F.cross_entropy(logits, y))
    # one expert with margins is LDAM: ride(s * z) = ldam(z) (RIDE's model applies s, LDAM's loss does)
    ride, ldam = RIDELoss(class_counts=COUNTS, s=30.0), LDAMLoss(class_counts=COUNTS, s=30.0)
    cos = torch.tanh(logits)
    torch.testing.assert_close(ride(30.0 * cos, y), ldam(cos, y))
    torch.testing.assert_close(ride(30.0 * cos[None], y), ldam(cos, y))
    # factor 0 (official quirk): every expert's LDAM term is on the mean logits
    experts = torch.randn(3, 5, 3, dtype=torch.float64)
    zero = RIDELoss(class_counts=COUNTS, additional_diversity_factor=0.0)
    torch.testing.assert_close(zero(experts, y), 3 * zero(experts.mean(0), y))


def test_gradcheck_float64():
    z = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.7, 1.0, 1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: diversity_kl(a, mean, 2.0), (z[0].detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda a: diversity_kl(a, mean, t), (z[0].detach().requires_grad_(),))
    loss = RIDELoss(class_counts=COUNTS, additional_diversity_factor=-0.45).double()
    y = torch.tensor([0, 1, 2, 0])
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (z,))
    loss.set_class_weight(effective_number_weights(COUNTS, 0.9999))
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (z,))


def test_kl_target_holds_no_gradient():
    # d/dz_e of KL(p || q_e) with p fixed is (q_e - p) / (B T): the mean's dependence on z_e is cut
    z = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mean = z.mean(0)
    diversity_kl(z[0], mean, 2.0).backward()
    p, q = F.softmax(mean.detach() / 2, 1), F.softmax(z[0].detach() / 2, 1)
    torch.testing.assert_close(z.grad[0], (q - p) / (3 * 2))
    assert torch.count_nonzero(z.grad[1]) == 0


def test_step_is_the_loss_of_the_expert_logits():
    _, _, recipe = tiny_recipe(**RIDE_CFG)
    model, loss = recipe.model, recipe.loss
    assert model.num_experts == 2 and loss.s == 30.0 and loss.additional_diversity_factor == -0.45
    check_expert_step(**RIDE_CFG)


def test_tiny_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**RIDE_CFG, **{"reweight.scheme": "effective_number", "reweight.start_epoch": 1})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert any(k.startswith("linears.1.") for k in a["model"])


@pytest.mark.parametrize("over,match", [
    ({"model.params": {}}, "model.params.experts"),
    ({"loss.name": "ldam", "loss.params": {}}, "'ride' loss"),
    ({"loss.params": {"s": 16.0}}, "must equal model.params.experts.scale"),
    ({"train.mixup_alpha": 0.2}, "mixup_alpha"),
    ({"loss.params": {"base_diversity_temperature": 0}}, "base_diversity_temperature"),
    ({"loss.params": {"reweight_factor": 1.5}}, "reweight_factor"),
])
def test_bad_params(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_recipe(**{**RIDE_CFG, **over})
    assert "\n" not in str(err.value)


def test_require_experts_counts_the_config_or_the_network():
    """methods/base.py require_experts, shared by ride, ride_router, ncl and sade: one line naming the
    method, model.params.experts and the count, from the config before a build or the built network."""
    from longtail.config import config_from_dict
    from longtail.methods.base import require_experts
    from longtail.models import build_model

    def cfg(experts):
        return config_from_dict(tiny_config(**{"model.name": "resnet20", "model.params": experts}))

    with pytest.raises(ConfigError, match=r"^method 'x' needs a network with at least 1 expert "
                                          r"\(model.params.experts, e.g. E\); model 'resnet20' has none$"):
        require_experts(cfg({}), "x", example="E")
    require_experts(cfg({"experts": {}}), "x", minimum=3, exactly=True)  # experts.num defaults to 3
    with pytest.raises(ConfigError, match=r"with exactly 3 experts \(model.params.experts\); model 'resnet20' has 2$"):
        require_experts(cfg({"experts": {"num": 2}}), "x", minimum=3, exactly=True)
    require_experts(cfg({"experts": 3}), "x", minimum=2)  # malformed: the network's own check names it
    two = build_model("resnet20", num_classes=3, params={"experts": {"num": 2}})
    require_experts(cfg({}), "x", minimum=2, model=two)  # the network's count, not the config's
    with pytest.raises(ConfigError, match="at least 3 experts .* has 2$"):
        require_experts(cfg({}), "x", minimum=3, model=two)
    with pytest.raises(ConfigError, match="has none$"):
        require_experts(cfg({}), "x", model=build_model("small_cnn", num_classes=3, params={"width": 4}))


def test_loss_rejects_bad_shapes():
    loss = build_loss("ride", {}, class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"\(E, B, C\)"):
        loss(torch.zeros(1, 2, 3, 3), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("folder", ["cifar10_lt", "cifar10_lt_full", "cifar100_lt"])
def test_configs_build_the_official_recipe(folder):
    from pathlib import Path

    from longtail.config import load_config
    from longtail.models import build_model

    path = Path(__file__).resolve().parents[1] / "configs" / folder / "ride.yaml"
    assert path.read_text().splitlines()[0] == f"# longtail train configs/{folder}/ride.yaml --out runs/{folder}_ride"
    cfg = load_config(path)
    assert cfg.method.name == "ride" and cfg.loss.name == "ride" and cfg.model.head == "cosine"
    assert cfg.reweight.start_epoch == (160 if folder.endswith("full") else 24)
    assert cfg.train.weight_decay == 0.0005 and cfg.train.nesterov
    model = build_model(cfg.model.name, num_classes=10, head=cfg.model.head, params=cfg.model.params)
    assert model.num_experts == 3 and model.layer3s[2][0].conv1.out_channels == 48
    loss = build_loss(cfg.loss.name, cfg.loss.params, class_counts=[500, 50, 5, 5, 5, 5, 5, 5, 5, 5])
    assert loss.s == model.head.scale == 30.0
