"""MetaSAug (methods/metasaug.py): the covariance's meta-gradient on a tiny linear model against
central finite differences in float64, the functional copy leaving the model untouched, the
official step order and plain-CE start, meta_lr 0 equal to ISDA (one step and a whole run), the
meta batch drawn from the validation split, exact resume, the validation-split requirement and
bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.methods.isda import isda_logits
from longtail.methods.metasaug import meta_covariance_step
from longtail.models.base import Classifier
from longtail.runs import train_run

VAL = {"data.val_per_class": 3}


class _Linear(Classifier):
    """logits = features W^T + b on flat (B, D) inputs: the tiny model of the gradient check."""

    head_name = "fc"

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.num_features = dim
        self.fc = nn.Linear(dim, classes)

    def forward_features(self, images):
        return images


def _meta_loss_by_hand(weight, bias, cov, x, y, xm, ym, *, lam, eta, loss):
    """CE on the meta batch after one SGD step of the ISDA loss, with plain tensors (no functional_call)."""
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    inner = loss(isda_logits(x @ w.t() + b, w, y, cov, lam), y)
    gw, gb = torch.autograd.grad(inner, (w, b))
    w2, b2 = weight - eta * gw, bias - eta * gb
    return float(F.cross_entropy(xm @ w2.t() + b2, ym))


@pytest.mark.parametrize("diagonal", [False, True])
def test_meta_gradient_matches_finite_differences_float64(diagonal):
    g = torch.Generator().manual_seed(0)
    dim, classes = 3, 4
    model = _Linear(dim, classes).double()
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(classes, dim, generator=g, dtype=torch.float64))
        model.fc.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    x, y = torch.randn(6, dim, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 0])
    xm, ym = torch.randn(5, dim, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3])
    a = torch.randn(classes, dim, dim, generator=g, dtype=torch.float64)
    cov = (a @ a.transpose(1, 2)) / dim
    if diagonal:
        cov = torch.diagonal(cov, dim1=1, dim2=2).clone()
    # an LDAM loss with DRW-like weights: the inner loss is the configured loss, weights included
    loss = build_loss("ldam", {"max_m": 0.5, "s": 1.0}, class_counts=[40, 20, 10, 5]).double()
    loss.set_class_weight(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    loss.class_weight = loss.class_weight.double()
    kw = dict(lam=0.7, eta=0.5, loss=loss)
    new, meta = meta_covariance_step(model, x, y, xm, ym, cov, loss=loss, lam=0.7, inner_lr=0.5, meta_lr=1.0)
    grad = cov - new
    assert float(meta) == pytest.approx(_meta_loss_by_hand(model.fc.weight.detach(), model.fc.bias.detach(), cov,
                                                           x, y, xm, ym, **kw), abs=1e-12)
    fd = torch.zeros_like(cov)
    h = 1e-6
    for idx in np.ndindex(*cov.shape):
        up, down = cov.clone(), cov.clone()
        up[idx] += h
        down[idx] -= h
        w, b = model.fc.weight.detach(), model.fc.bias.detach()
        fd[idx] = (_meta_loss_by_hand(w, b, up, x, y, xm, ym, **kw)
                   - _meta_loss_by_hand(w, b, down, x, y, xm, ym, **kw)) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6)
    assert grad[3].abs().sum() == 0 and grad[:3].abs().sum() > 0  # class 3 is not in the training batch
    # meta_lr scales the step; 0 returns the covariance exactly
    half, _ = meta_covariance_step(model, x, y, xm, ym, cov, loss=loss, lam=0.7, inner_lr=0.5, meta_lr=0.5)
    assert torch.allclose(half, cov - 0.5 * grad, atol=1e-14)
    same, _ = meta_covariance_step(model, x, y, xm, ym, cov, loss=loss, lam=0.7, inner_lr=0.5, meta_lr=0.0)
    assert torch.equal(same, cov)


def test_meta_gradient_by_hand_when_the_inner_step_is_zero():
    # eta = 0: theta' = theta does not depend on Sigma, so the meta-gradient is exactly 0
    g = torch.Generator().manual_seed(1)
    model = _Linear(2, 3).double()
    x, y = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    cov = torch.eye(2, dtype=torch.float64).repeat(3, 1, 1)
    loss = build_loss("ce", {}, class_counts=[4, 2, 1]).double()
    new, meta = meta_covariance_step(model, x, y, x, y, cov, loss=loss, lam=1.0, inner_lr=0.0, meta_lr=1.0)
    assert torch.equal(new, cov)
    with torch.no_grad():
        assert float(meta) == pytest.approx(float(F.cross_entropy(model(x), y)), abs=1e-14)


def test_the_functional_copy_leaves_the_model_untouched():
    cfg, data, recipe = tiny_recipe(**{"method.name": "metasaug", **VAL})
    model = recipe.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    d = model.num_features
    cov = torch.eye(d).repeat(4, 1, 1)
    new, _ = meta_covariance_step(model, images, target, images[:4], target[:4], cov, loss=recipe.loss, lam=0.5,
                                  inner_lr=0.1, meta_lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics included
    assert all(p.grad is None for p in model.parameters())
    assert not new.requires_grad and new.shape == cov.shape and not torch.equal(new, cov)


def _batch(data, recipe, n=8):
    pos = recipe.sampler.indices(0)[:n]
    images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
    return images, torch.from_numpy(data.train.labels[pos])


def test_meta_lr_zero_before_loss_step_equals_isda():
    over = {**VAL, "train.epochs": 4}
    _, data, isda = tiny_recipe(**{"method.name": "isda", "method.params": {"lambda0": 0.5}, **over})
    _, _, meta = tiny_recipe(**{"method.name": "metasaug", **over, "method.params": {
        "lambda0": 0.5, "meta_lr": 0.0, "start_epoch": 0, "covariance_update": "before_loss", "meta_batch_size": 4}})
    images, target = _batch(data, isda)
    for recipe in (isda, meta):
        recipe.method.on_epoch_start(2, recipe.loss)
        recipe.model.train()
    for _ in range(2):  # the second step uses a covariance estimated from two batches
        a = isda.method.training_step(isda.model, split_forward(isda.model), images, target, isda.loss,
                                      torch.Generator())
        b = meta.method.training_step(meta.model, split_forward(meta.model), images, target, meta.loss,
                                      torch.Generator())
        assert torch.equal(a.loss, b.loss)  # (training accuracy: ISDA scores augmented logits, MetaSAug plain)
    assert torch.equal(isda.method.state_dict()["cov"], meta.method.state_dict()["cov"])


def test_official_order_start_and_meta_batch():
    over = {**VAL, "train.epochs": 10, "loss.name": "ldam", "loss.params": {"s": 1.0},
            "reweight": {"scheme": "effective_number", "beta": 0.9999, "start_epoch": 8}}
    cfg, data, recipe = tiny_recipe(**{"method.name": "metasaug", **over, "method.params": {"meta_batch_size": 5}})
    method, model = recipe.method, recipe.model.train()
    assert method.start_epoch == 8 and method.plain_ce_epochs() == 8  # round(0.8 * 10): 160 of 200
    images, target = _batch(data, recipe)
    method.on_epoch_start(7, recipe.loss)
    out = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
    assert torch.equal(out.loss, F.cross_entropy(out.logits, target))  # plain unweighted CE, not LDAM
    assert method.state_dict() == {}  # no covariance estimate before the start
    method.on_epoch_start(8, recipe.loss)
    assert recipe.loss.class_weight is not None and method.lam == pytest.approx(0.75 * 8 / 10)
    assert method._inner_lr_now == pytest.approx(0.05 * 0.01)  # the epoch's learning rate (tiny milestone 1)
    out = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
    # official order: this step's covariance is the estimate before the batch (zeros: plain logits)
    assert torch.allclose(out.loss, recipe.loss(out.logits, target), atol=1e-6)
    counts = method.state_dict()["count"]
    assert counts.tolist() == np.bincount(target.numpy(), minlength=4).tolist()
    # the meta batch: validation images only, the same for the same (seed, epoch, step)
    method._step = 3
    a_img, a_lab = method.meta_batch(torch.device("cpu"))
    b_img, b_lab = method.meta_batch(torch.device("cpu"))
    assert a_img.shape == (5, 3, 8, 8) and torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert set(a_lab.tolist()) <= set(data.val.labels.tolist())
    method._step = 4
    assert not torch.equal(method.meta_batch(torch.device("cpu"))[0], a_img)
    method.meta_batch_size = 100  # larger than the split: the whole split
    assert method.meta_batch(torch.device("cpu"))[1].shape == (len(data.val),)


def test_meta_lr_zero_run_equals_isda_run(tmp_path):
    arrays = tiny_arrays()
    isda = tiny_config(**{"method.name": "isda", "method.params": {"lambda0": 0.5}, **VAL})
    meta = tiny_config(**{"method.name": "metasaug", **VAL, "method.params": {
        "lambda0": 0.5, "meta_lr": 0.0, "start_epoch": 0, "covariance_update": "before_loss"}})
    train_run(config_from_dict(isda), tmp_path / "isda", arrays=arrays, evaluate=False)
    train_run(config_from_dict(meta), tmp_path / "meta", arrays=arrays, evaluate=False)
    a, b = last_checkpoints(tmp_path / "isda", tmp_path / "meta")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["cov"], b["method"]["cov"])


def test_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "metasaug", **VAL, "method.params": {"start_epoch": 0, "meta_batch_size": 6}})
    full, cut, mid = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                      evaluate=False)
    assert mid["method"]["count"].sum() > 0  # the estimator is in the interrupted checkpoint
    a, b = last_checkpoints(full, cut)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in ("cov", "mean", "count"))
    # the meta step changed training: a meta_lr 0 run ends elsewhere
    cfg0 = tiny_config(**{"method.name": "metasaug", **VAL,
                          "method.params": {"start_epoch": 0, "meta_batch_size": 6, "meta_lr": 0.0}})
    train_run(config_from_dict(cfg0), tmp_path / "zero", arrays=tiny_arrays(), evaluate=False)
    c, _ = last_checkpoints(tmp_path / "zero", cut)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_needs_a_validation_split(tmp_path):
    cfg = config_from_dict(tiny_config(**{"method.name": "metasaug"}))
    with pytest.raises(ConfigError, match=r"data\.val_per_class") as err:
        train_run(cfg, tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("over, key", [
    ({"method.params": {"meta_lr": -0.1}}, "meta_lr"),
    ({"method.params": {"meta_lr": True}}, "meta_lr"),
    ({"method.params": {"start_epoch": -1}}, "start_epoch"),
    ({"method.params": {"start_epoch": 1.5}}, "start_epoch"),
    ({"method.params": {"meta_batch_size": 0}}, "meta_batch_size"),
    ({"method.params": {"inner_lr": -1}}, "inner_lr"),
    ({"method.params": {"covariance_update": "never"}}, "covariance_update"),
    ({"method.params": {"pre_start_loss": "focal"}}, "pre_start_loss"),
    ({"method.params": {"lambda0": -1}}, "lambda0"),
    ({"method.params": {"meta_step": 1}}, "meta_step"),
    ({"train.mixup_alpha": 1.0}, "mixup_alpha"),
    ({"loss.name": "seesaw"}, "seesaw"),
    ({"model.head": "cosine"}, "linear head"),
])
def test_bad_params_are_one_line_config_errors(over, key, tmp_path):
    from longtail.data.build import build_data
    from longtail.methods import build_recipe

    cfg = config_from_dict(tiny_config(**{"method.name": "metasaug", **VAL, **over}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match=key) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)
