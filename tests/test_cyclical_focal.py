"""Cyclical focal loss (losses/cyclical_focal.py): the official xi schedule, hand-computed values,
the CE setting, gradients, train.epochs wiring, training with an exact resume, bad parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.losses.cyclical_focal import CyclicalFocalLoss, cyclical_xi
from longtail.methods import build_recipe

COUNTS = [30, 10, 3]


def test_xi_schedule_matches_the_official_branches():
    # factor 2, E = 5: 1 - 2e/4 while 2e < 5, then (2e/4 - 1) / 1
    assert [cyclical_xi(e, 5, 2.0) for e in range(5)] == [1.0, 0.5, 0.0, 0.5, 1.0]
    # factor 1 ("modified"): linear 1 -> 0 over the whole run
    assert [cyclical_xi(e, 5, 1.0) for e in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # the README's factor 4 over the 30-epoch budget: ~0 at epoch 7, back to 1 at epoch 29
    assert cyclical_xi(7, 30, 4.0) == pytest.approx(1 - 28 / 29)
    assert cyclical_xi(8, 30, 4.0) == pytest.approx((32 / 29 - 1) / 3)
    assert cyclical_xi(29, 30, 4.0) == pytest.approx(1.0)
    assert cyclical_xi(0, 1, 4.0) == 1.0  # a one-epoch run (E - 1 = 0)


def _by_hand(z, y, xi, gp, gn, ghc, eps):
    c = len(z)
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    total = 0.0
    for j in range(c):
        q = (1 - eps) * (j == y) + eps / c
        a = (1 - p[j]) ** gp if j == y else p[j] ** gn
        b = (1 + p[j]) ** ghc if j == y else 1.0
        total -= q * ((1 - xi) * a + xi * b) * math.log(p[j])
    return total


def test_hand_computed_at_several_epochs():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 1.0]])
    target = torch.tensor([0, 1])
    loss = CyclicalFocalLoss(class_counts=COUNTS, epochs=5, factor=2.0)
    for epoch, xi in ((0, 1.0), (1, 0.5), (2, 0.0)):
        loss.on_epoch_start(epoch)
        assert loss.xi == xi
        want = sum(_by_hand(z, y, xi, 2.0, 2.0, 3.0, 0.1) for z, y in zip(logits.tolist(), target.tolist())) / 2
        assert math.isclose(float(loss(logits, target)), want, rel_tol=1e-5)
    # class weight: PyTorch's weighted mean sum w_y l / sum w_y
    loss.set_class_weight(torch.tensor([0.5, 2.0, 1.0]))
    per = [_by_hand(z, y, 0.0, 2.0, 2.0, 3.0, 0.1) for z, y in zip(logits.tolist(), target.tolist())]
    assert math.isclose(float(loss(logits, target)), (0.5 * per[0] + 2.0 * per[1]) / 2.5, rel_tol=1e-5)


def test_neutral_setting_is_cross_entropy_at_every_epoch():
    assert CyclicalFocalLoss.neutral_params == {"gamma_pos": 0.0, "gamma_neg": 0.0, "gamma_hc": 0.0,
                                                "label_smoothing": 0.0}
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    loss = CyclicalFocalLoss(class_counts=COUNTS, epochs=7, **CyclicalFocalLoss.neutral_params)
    for epoch in range(7):
        loss.on_epoch_start(epoch)
        assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    # the gammas off but label smoothing on: PyTorch's label-smoothed CE
    smooth = CyclicalFocalLoss(class_counts=COUNTS, epochs=7, gamma_pos=0.0, gamma_neg=0.0, gamma_hc=0.0)
    assert torch.allclose(smooth(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1), atol=1e-6)


@pytest.mark.parametrize("epoch", [0, 2, 5])
def test_gradcheck_along_the_schedule(epoch):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 2, 0])
    loss = CyclicalFocalLoss(class_counts=COUNTS, epochs=6, gamma_pos=1.5, gamma_neg=2.5, gamma_hc=3.0, factor=3.0)
    loss.on_epoch_start(epoch)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


def test_the_run_sets_epochs_unless_the_config_does():
    data = build_data(config_from_dict(tiny_config()).data, arrays=tiny_arrays())
    cfg = config_from_dict(tiny_config(**{"loss.name": "cyclical_focal", "train.epochs": 3}))
    assert build_recipe(cfg, data).loss.epochs == 3
    cfg = config_from_dict(tiny_config(**{"loss": {"name": "cyclical_focal", "params": {"epochs": 201}}}))
    assert build_recipe(cfg, data).loss.epochs == 201
    assert build_loss("cyclical_focal", class_counts=COUNTS).epochs is None  # outside a run: unset
    with pytest.raises(ValueError, match="cyclical_focal needs epochs"):
        build_loss("cyclical_focal", class_counts=COUNTS).on_epoch_start(0)


def test_trains_and_resumes_exactly(tmp_path, monkeypatch):
    # factor 1 over 3 epochs: xi = 1, 0.5, 0, so a resume that kept a fresh xi (1) would differ
    cfg = tiny_config(**{"loss": {"name": "cyclical_focal", "params": {"factor": 1.0}}, "train.epochs": 3,
                         "train.milestones": [2]})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=1, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("params, match", [
    ({"gamma_pos": -1.0}, "gamma_pos must be a finite number >= 0"),
    ({"gamma_neg": "2"}, "gamma_neg must be a finite number >= 0"),
    ({"gamma_hc": -0.5}, "gamma_hc must be a finite number >= 0"),
    ({"factor": 0.5}, "factor must be a finite number >= 1"),
    ({"label_smoothing": 1.0}, "label_smoothing must be a finite number >= 0 and < 1"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"gama_hc": 3.0}, "has no parameter 'gama_hc'"),
])
def test_bad_parameters(params, match):
    data = build_data(config_from_dict(tiny_config()).data, arrays=tiny_arrays())
    cfg = config_from_dict(tiny_config(**{"loss": {"name": "cyclical_focal", "params": params}}))
    with pytest.raises(ConfigError, match=match) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)
