"""Remix (methods/remix.py): Eq. 10's kappa / tau rules by hand, the per-sample loss by groups,
kappa = inf is mixup bitwise (one step and a whole run), DRW composes, resume is exact, bad
parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.data.mixup import mixup_batch
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses import build_loss, effective_number_weights
from longtail.methods import build_recipe
from longtail.methods.remix import remix_label_lambda, remix_loss
from longtail.runs import train_run

# four pairs (own class count n_i, partner's n_j): 100/10 (ratio 10), 10/100 (0.1), 30/10 (exactly
# kappa = 3), 30/34 (balanced-ish)
N_I = torch.tensor([100.0, 10.0, 30.0, 30.0])
N_J = torch.tensor([10.0, 100.0, 10.0, 34.0])


@pytest.mark.parametrize("lam, want", [
    (0.3, [0.0, 0.3, 0.0, 0.3]),  # lam < tau: majority own class (ratio >= 3, boundary included) -> label 0
    (0.8, [0.8, 1.0, 0.8, 0.8]),  # 1 - lam < tau: minority own class (ratio <= 1/3) -> label 1
    (0.5, [0.5, 0.5, 0.5, 0.5]),  # neither strict inequality holds at tau = 0.5
])
def test_kappa_tau_rules_by_hand(lam, want):
    got = remix_label_lambda(N_I, N_J, lam, kappa=3.0, tau=0.5)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, abs=0)
    # the reversed pair (10 vs 30, ratio exactly 1/3) takes the whole label at lam = 0.8
    assert remix_label_lambda(torch.tensor([10.0]), torch.tensor([30.0]), 0.8, kappa=3.0, tau=0.5).item() == 1.0
    # kappa = inf never fires; tau = 0 never fires; tau = 1 fires for both directions at once
    assert remix_label_lambda(N_I, N_J, lam, kappa=math.inf, tau=0.5).tolist() == [lam] * 4
    assert remix_label_lambda(N_I, N_J, lam, kappa=3.0, tau=0.0).tolist() == [lam] * 4
    assert remix_label_lambda(N_I, N_J, 0.3, kappa=3.0, tau=1.0).tolist() == [0.0, 1.0, 0.0, 0.3]


def _per_sample(logits, a, b, lam_y, weight=None):
    la = F.cross_entropy(logits, a, reduction="none")
    lb = F.cross_entropy(logits, b, reduction="none")
    if weight is None:
        return (lam_y * la + (1 - lam_y) * lb).mean()
    # DRW: PyTorch's weighted mean inside each group of equal lam_y, groups weighted by size
    total = 0.0
    for v in torch.unique(lam_y):
        m = lam_y == v
        wa, wb = weight[a[m]], weight[b[m]]
        ga = (wa * la[m]).sum() / wa.sum()
        gb = (wb * lb[m]).sum() / wb.sum()
        total = total + m.sum() / len(lam_y) * (v * ga + (1 - v) * gb)
    return total


def test_per_sample_loss_by_groups_equals_the_per_sample_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a, b = torch.tensor([0, 2, 0, 1]), torch.tensor([2, 0, 2, 1])
    loss = build_loss("ce", {}, class_counts=[100, 30, 10])
    for lam in (0.3, 0.8, 0.5):
        lam_y = remix_label_lambda(N_I, N_J, lam, kappa=3.0, tau=0.5).to(torch.float64)
        got = remix_loss(loss, logits, a, b, lam, lam_y)
        assert torch.allclose(got, _per_sample(logits, a, b, lam_y), rtol=1e-12, atol=0)
    # with a DRW class weight
    w = effective_number_weights([100, 30, 10], 0.9999).to(torch.float64)
    loss.set_class_weight(w)
    for lam in (0.3, 0.8):
        lam_y = remix_label_lambda(N_I, N_J, lam, kappa=3.0, tau=0.5).to(torch.float64)
        assert torch.allclose(remix_loss(loss, logits, a, b, lam, lam_y),
                              _per_sample(logits, a, b, lam_y, weight=loss.class_weight.double()), rtol=1e-6)


def _recipe(**over):
    return tiny_recipe(**{"method.name": "remix", **over})


_forward = split_forward


IMAGES = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _target(data):
    return torch.as_tensor(data.train.labels[:16].copy())


def test_training_step_applies_the_rules_to_the_batch():
    cfg, data, recipe = _recipe()
    method, model = recipe.method, recipe.model
    model.eval()
    counts = torch.as_tensor(data.class_counts, dtype=torch.float64)
    assert counts.max() / counts.min() >= 3  # the tiny profile has pairs on both sides of kappa
    target = torch.tensor([0, 3, 0, 3, 1, 2, 0, 3, 2, 1, 0, 3, 1, 0, 3, 2])
    for seed in range(6):  # several lam draws, below and above tau
        method.on_epoch_start(0, recipe.loss)
        out = method.training_step(model, _forward(model), IMAGES, target, recipe.loss,
                                   torch.Generator().manual_seed(seed))
        mixed, target_b, lam = mixup_batch(IMAGES, target, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        logits = model(mixed)
        lam_y = remix_label_lambda(counts[target], counts[target_b], lam, kappa=3.0, tau=0.5)
        assert torch.allclose(out.loss.double(), _per_sample(logits.double(), target, target_b, lam_y), rtol=1e-5)
        assert torch.equal(out.target, target)


def test_batch_mean_reading_is_bagoftricks_expression():
    cfg, data, recipe = _recipe(**{"method.params": {"label_mixing": "batch_mean"}})
    model = recipe.model
    model.eval()
    counts = torch.as_tensor(data.class_counts, dtype=torch.float64)
    target = torch.tensor([0, 3] * 8)
    out = recipe.method.training_step(model, _forward(model), IMAGES, target, recipe.loss,
                                      torch.Generator().manual_seed(3))
    mixed, target_b, lam = mixup_batch(IMAGES, target, alpha=1.0, generator=torch.Generator().manual_seed(3))
    logits = model(mixed)
    lbar = float(remix_label_lambda(counts[target], counts[target_b], lam, kappa=3.0, tau=0.5).mean())
    want = lbar * F.cross_entropy(logits, target) + (1 - lbar) * F.cross_entropy(logits, target_b)
    assert torch.allclose(out.loss, want, rtol=1e-6)


def test_kappa_inf_is_mixup_bitwise_in_a_step():
    _, data, remix = _recipe(**{"method.params": {"kappa": math.inf}})
    cfg = config_from_dict(tiny_config(**{"train.mixup_alpha": 1.0}))
    torch.manual_seed(0)
    mixup = build_recipe(cfg, data)
    target = _target(data)
    for seed in range(4):
        a = remix.method.training_step(remix.model, _forward(remix.model), IMAGES, target, remix.loss,
                                       torch.Generator().manual_seed(seed))
        b = mixup.method.training_step(mixup.model, _forward(mixup.model), IMAGES, target, mixup.loss,
                                       torch.Generator().manual_seed(seed))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)


def test_kappa_inf_run_is_the_mixup_run_bitwise(tmp_path):
    arrays = tiny_arrays()
    train_run(config_from_dict(tiny_config(**{"method.name": "remix", "method.params": {"kappa": math.inf}})),
              tmp_path / "remix", arrays=arrays, evaluate=False)
    train_run(config_from_dict(tiny_config(**{"train.mixup_alpha": 1.0})), tmp_path / "mixup", arrays=arrays,
              evaluate=False)
    a = safe_torch_load(tmp_path / "remix/checkpoints/last.pt")["model"]
    b = safe_torch_load(tmp_path / "mixup/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_remix_drw_trains_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "remix", "reweight": {"scheme": "effective_number", "start_epoch": 1}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("params, key", [
    ({"alpha": 0}, "alpha"), ({"alpha": True}, "alpha"), ({"kappa": 0.5}, "kappa"), ({"kappa": "3"}, "kappa"),
    ({"kappa": math.nan}, "kappa"), ({"tau": 1.5}, "tau"), ({"tau": -0.1}, "tau"),
    ({"label_mixing": "soft"}, "label_mixing"), ({"beta": 1.0}, "beta"),
])
def test_bad_parameters(params, key):
    with pytest.raises(ConfigError, match=f"method 'remix'.*{key}"):
        _recipe(**{"method.params": params})
    with pytest.raises(ConfigError, match="train.mixup_alpha"):
        _recipe(**{"train.mixup_alpha": 1.0})
