"""GLMC (methods/glmc.py): class weights, the cumulative alpha, the soft losses by hand, the step's
loss rebuilt by hand, the shared-lam CutMix box (ceil), neutral settings, gradcheck, a 2-epoch run
that resumes exactly, bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.data.mixup import cutmix_batch
from longtail.errors import ConfigError
from longtail.methods.base import TrainBatches
from longtail.methods.glmc import (cumulative_alpha, label_weights, negative_cosine, rebalanced_seed,
                                   soft_cross_entropy)

GLMC = {"method.name": "glmc"}


def test_weights_alpha_and_losses_by_hand():
    w = label_weights([100, 25, 4], 1.0)
    inv = np.array([1 / 100, 1 / 25, 1 / 4])
    assert torch.allclose(w, torch.tensor(inv / inv.sum() * 3, dtype=torch.float32))
    assert torch.allclose(label_weights([100, 25, 4], 0.0), torch.ones(3))
    assert [cumulative_alpha(e, 4) for e in range(4)] == [1.0, 1 - 1 / 16, 1 - 4 / 16, 1 - 9 / 16]
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    got = soft_cross_entropy(logits, torch.tensor([[0.5, 2.0]]))
    assert math.isclose(float(got), -(0.5 * math.log(0.25) + 2.0 * math.log(0.75)), rel_tol=1e-6)
    p, z = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert math.isclose(float(negative_cosine(p, z)), -(1 / math.sqrt(2) + 1.0) / 2, rel_tol=1e-6)


def test_cutmix_given_lam_and_ceil_box():
    images, partner = torch.zeros(1, 1, 5, 5), torch.ones(1, 1, 5, 5)
    t = torch.tensor([0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, _, kept_a = cutmix_batch(images, t, alpha=1.0, generator=g1, partner=(partner, t), lam=0.75)
    b, _, kept_b = cutmix_batch(images, t, alpha=1.0, generator=g2, partner=(partner, t), lam=0.75, ceil=True)
    # side 5 * sqrt(0.25) = 2.5: int 2, ceil 3 (half sides 1 either way, before clipping); no Beta draw
    assert float(a.sum()) <= 4 and float(b.sum()) <= 4 and kept_a == 1 - float(a.sum()) / 25
    assert math.isclose(kept_b, 1 - float(b.sum()) / 25)


def _stub(recipe, epoch, v, y_v, v2, step=0):
    seen = []

    def fetch_views(positions, generator):
        seen.append(np.asarray(positions))
        return v, y_v, (v2,)

    recipe.method.on_epoch_start(epoch, recipe.loss)
    recipe.method.batches = TrainBatches(fetch=None, fetch_views=fetch_views, epoch=epoch, step=step,
                                         global_size=v.shape[0])
    return seen


def test_step_loss_by_hand():
    cfg, data, recipe = tiny_recipe(**GLMC, **{"train.epochs": 4})
    method, model = recipe.method, recipe.model.eval()  # eval: BatchNorm independent of the batch
    g = torch.Generator().manual_seed(1)
    x, x2, v, v2 = (torch.rand(4, 3, 8, 8, generator=g) for _ in range(4))
    y, y_v = torch.tensor([0, 1, 0, 2]), torch.tensor([3, 2, 3, 1])
    seen = _stub(recipe, 2, v, y_v, v2, step=5)
    method.batches.views = (x2,)
    out = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator().manual_seed(9))
    want_pos = method.sampler().draw(4, torch.Generator().manual_seed(rebalanced_seed(cfg.train.seed, 2, 5)))
    assert len(seen) == 1 and np.array_equal(seen[0], want_pos)
    gen = torch.Generator().manual_seed(9)
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(1.0, 1.0))
    x_mix = lam * x + (1 - lam) * v
    x_cut, _, _ = cutmix_batch(x2, y, alpha=1.0, generator=gen, partner=(v2, y_v), lam=lam, ceil=True)
    c = data.num_classes
    Y = lam * F.one_hot(y, c).float() + (1 - lam) * F.one_hot(y_v, c).float()
    w = label_weights(data.class_counts, 1.2)
    total_bal = total_reb = 0.0
    zs, ps = [], []
    for xm in (x_mix, x_cut):
        f = model.forward_head(model.forward_features(xm), pre_logits=True)
        total_bal += -(F.log_softmax(model.glmc_fc(f), 1) * Y).sum(1).mean()
        total_reb += -(F.log_softmax(model.head(f), 1) * Y * w).sum(1).mean()
        zs.append(model.glmc_projection(f))
        ps.append(model.glmc_predictor(zs[-1]))
    con = -F.cosine_similarity(ps[0], zs[1]).mean() - F.cosine_similarity(ps[1], zs[0]).mean()
    alpha = 1 - (2 / 4) ** 2
    want = alpha * total_bal + (1 - alpha) * total_reb + 4.0 * con
    assert torch.allclose(out.loss, want, atol=1e-5)
    assert torch.allclose(out.logits, model(x_mix), atol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.rand(3, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: soft_cross_entropy(z, soft), (logits,))
    p = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: negative_cosine(q, z), (p,))


def test_neutral_soft_ce_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    # lam = 1 and equal class weights: both branches are plain CE on the uniform batch's labels
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(target, 5).float()), F.cross_entropy(logits, target))
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(target, 5).float() * label_weights([7] * 5, 1.2)),
                          F.cross_entropy(logits, target))


def test_trains_through_the_loop_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**GLMC, **{"data.val_per_class": 2})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert "glmc_fc.weight" in a["model"] and (full / "eval.json").exists()


@pytest.mark.parametrize("over, key", [
    ({"method.params": {"contrast_weight": -1}}, "contrast_weight"),
    ({"method.params": {"label_weighting": "a"}}, "label_weighting"),
    ({"method.params": {"resample_weighting": -0.1}}, "resample_weighting"),
    ({"method.params": {"mix_alpha": 0}}, "mix_alpha"),
    ({"method.params": {"hidden_dim": 0}}, "hidden_dim"),
    ({"method.params": {"adjust_lam": 1}}, "adjust_lam"),
    ({"method.params": {"view": "nope"}}, "view"),
    ({"method.params": {"beta": 0.5}}, "beta"),
    ({"model.head": "cosine"}, "model.head"),
    ({"loss.name": "focal"}, "loss.name"),
    ({"train.mixup_alpha": 1.0}, "mixup_alpha"),
])
def test_bad_params(over, key):
    with pytest.raises(ConfigError, match=key) as err:
        tiny_recipe(**{**GLMC, **over})
    assert "\n" not in str(err.value)
