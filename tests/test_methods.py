"""Recipes beyond a loss: mixup, ISDA, decoupled cRT / LWS / tau-norm / NCM."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.mixup import mixup_batch
from longtail.errors import CheckpointError, ConfigError
from longtail.methods.isda import CovarianceEstimator, isda_logits
from longtail.runs import train_run
from longtail.io import safe_torch_load


def test_mixup_batch_formula_and_determinism():
    images = torch.arange(4 * 2, dtype=torch.float32).view(4, 2, 1, 1)
    target = torch.tensor([0, 1, 2, 3])
    mixed, target_b, lam = mixup_batch(images, target, alpha=1.0, generator=torch.Generator().manual_seed(0))
    again, target_b2, lam2 = mixup_batch(images, target, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert lam == lam2 and torch.equal(target_b, target_b2) and 0 < lam < 1
    perm = target_b  # labels equal positions here
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[perm])


def test_covariance_estimator_equals_batch_statistics():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([0] * 25 + [1] * 15)
    est = CovarianceEstimator(2, 3)
    est.cov, est.mean, est.count = est.cov.double(), est.mean.double(), est.count.double()
    est.update(feats[:17], target[:17])  # two batches ...
    est.update(feats[17:], target[17:])
    for c in (0, 1):
        x = feats[target == c].numpy()
        assert np.allclose(est.mean[c].numpy(), x.mean(0))
        assert np.allclose(est.cov[c].numpy(), np.cov(x.T, bias=True))  # ... equal one pass over all
        assert est.count[c] == len(x)


def test_isda_logits_by_hand():
    # C = 2, D = 2; w_0 = (1, 0), w_1 = (0, 1); Sigma_0 = diag(2, 3); target 0:
    # (w_1 - w_0) = (-1, 1): quad = 2 + 3 = 5; z_hat_1 = z_1 + lam/2 * 5; z_hat_0 = z_0
    weight = torch.eye(2)
    cov = torch.stack([torch.diag(torch.tensor([2.0, 3.0])), torch.eye(2)])
    logits = torch.tensor([[0.5, -0.5]])
    out = isda_logits(logits, weight, torch.tensor([0]), cov, lam=0.4)
    assert torch.allclose(out, torch.tensor([[0.5, -0.5 + 0.2 * 5]]))
    assert torch.equal(isda_logits(logits, weight, torch.tensor([0]), cov, lam=0.0), logits)
    diag = isda_logits(logits, weight, torch.tensor([0]), torch.tensor([[2.0, 3.0], [1.0, 1.0]]), lam=0.4)
    assert torch.allclose(diag, out)


def test_isda_gradcheck_through_weight():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2)
    feats = torch.randn(5, 4, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(
        lambda w: F.cross_entropy(isda_logits(feats @ w.t(), w, target, cov, lam=0.5), target), (weight,))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    cfg = config_from_dict(tiny_config(**{"data.val_per_class": 2, "train.epochs": 2}))
    train_run(cfg, root / "ce", arrays=tiny_arrays())
    return root / "ce" / "checkpoints" / "last.pt"


def _stage2(tmp_path, stage1, name, **over):
    cfg = tiny_config(**{"data.val_per_class": 2, "method.name": name, "method.params": {"stage1": str(stage1)},
                         "sampler.name": "class_aware", **over})
    return train_run(config_from_dict(cfg), tmp_path / name, arrays=tiny_arrays())


def test_crt_retrains_only_a_fresh_head(tmp_path, stage1):
    _stage2(tmp_path, stage1, "crt", **{"method.params": {"stage1": str(stage1), "retrain_bn_stats": False}})
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "crt/checkpoints/last.pt")["model"]
    for k in before:
        if k.startswith("fc."):
            assert not torch.equal(before[k], after[k])
        else:  # backbone weights and (frozen) BN statistics untouched
            assert torch.equal(before[k], after[k]), k


def test_crt_can_reestimate_bn_statistics(tmp_path, stage1):
    _stage2(tmp_path, stage1, "crt")
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "crt/checkpoints/last.pt")["model"]
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])


def test_lws_trains_only_scales(tmp_path, stage1):
    _stage2(tmp_path, stage1, "lws")
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "lws/checkpoints/last.pt")["model"]
    assert torch.equal(before["fc.weight"], after["fc.linear.weight"])
    assert not torch.equal(after["fc.scales"], torch.ones(4))


def test_tau_norm_selects_on_validation(tmp_path, stage1):
    result = _stage2(tmp_path, stage1, "tau_norm")
    info = json.loads((tmp_path / "tau_norm/posthoc.json").read_text())
    assert info["selected_on"] == "validation top1" and len(info["grid"]) == 21
    assert info["tau"] == info["grid"][int(np.argmax(info["val_top1"]))]
    weight = safe_torch_load(stage1)["model"]["fc.weight"]
    preds = np.load(tmp_path / "tau_norm/predictions.npz")
    assert result["epoch"] == 0 and preds["logits"].shape == (24, 4)
    # the saved tau reproduces the logits: x . w / ||w||^tau
    assert safe_torch_load(tmp_path / "tau_norm/checkpoints/last.pt")["model"]["fc.tau"] == pytest.approx(info["tau"])
    assert weight.shape == (4, 4 * 2)


def test_tau_norm_without_validation_split(tmp_path, stage1):
    with pytest.raises(ConfigError, match="validation split"):
        _stage2(tmp_path, stage1, "tau_norm", **{"data.val_per_class": 0})
    assert not (tmp_path / "tau_norm").exists()


def test_ncm_centroids(tmp_path, stage1):
    result = _stage2(tmp_path, stage1, "ncm")
    head = safe_torch_load(tmp_path / "ncm/checkpoints/last.pt")["model"]
    assert head["fc.centroids"].shape == (4, 8) and 0 <= result["top1"] <= 100


def test_missing_stage1_fails_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        _stage2(tmp_path, tmp_path / "none.pt", "crt")
    assert not (tmp_path / "crt").exists()
    with pytest.raises(ConfigError, match="needs method.params.stage1"):
        train_run(config_from_dict(tiny_config(**{"method.name": "crt"})), tmp_path / "x", arrays=tiny_arrays())


def test_isda_and_mixup_runs_resume_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "isda", "train.mixup_alpha": 1.0, "train.epochs": 3})
    full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=1, arrays=tiny_arrays())
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["cov"], b["method"]["cov"]) and a["method"]["count"].sum() > 0
