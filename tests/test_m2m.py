"""M2m (methods/m2m.py): the seed-class probability, the translation objective and one step by hand
on a tiny linear classifier, the random start, the rejection rule, the deferred over-sampler, a
generating step, a 3-epoch tiny run that resumes exactly, classifier path errors, bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.errors import ConfigError, LongtailError
from longtail.methods.m2m import (accepted, l2_step, random_start, seed_weights, translate,
                                  translation_objective)
from longtail.runs import train_run


@pytest.fixture(scope="module")
def erm_run(tmp_path_factory):
    """g: a 1-epoch plain-CE run on the tiny data."""
    root = tmp_path_factory.mktemp("m2m_g")
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce"


def _m2m(g, **params):
    return {"method.name": "m2m", "method.params": {"classifier": str(g), **params}}


def test_seed_weights_and_probabilities_by_hand():
    counts = torch.tensor([4.0, 2.0, 1.0])
    labels = torch.tensor([0, 1, 2, 0])
    w = seed_weights(counts, labels, torch.tensor([2, 1, 0]), beta=0.5)
    # target 2 (n=1): deltas (3, 1, 0, 3) -> 1 - 0.5^d = (7/8, 1/2, 0, 7/8)
    # target 1 (n=2): deltas (2, 0, 0, 2) -> (3/4, 0, 0, 3/4); target 0: no larger class -> all 0
    expected = torch.tensor([[7 / 8, 1 / 2, 0, 7 / 8], [3 / 4, 0, 0, 3 / 4], [0, 0, 0, 0]])
    assert torch.allclose(w, expected)
    probs = w[0] / w[0].sum()  # multinomial draws rows proportionally: 7/18, 4/18, 0, 7/18
    assert torch.allclose(probs, torch.tensor([7 / 18, 4 / 18, 0.0, 7 / 18]))
    draws = torch.multinomial(w[:1].expand(20000, 4), 1, replacement=True,
                              generator=torch.Generator().manual_seed(0)).view(-1)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.015)
    # beta 0.999 (official): the weight of a seed from a 100x larger class, 1 - 0.999^99
    big = seed_weights(torch.tensor([100.0, 1.0]), torch.tensor([0]), torch.tensor([1]), beta=0.999)
    assert math.isclose(float(big), 1 - 0.999 ** 99, rel_tol=1e-5)


def _linear(weight):
    w = torch.tensor(weight, dtype=torch.float64)
    return lambda x: x.flatten(1) @ w.t()


def test_objective_value_and_one_step_by_hand():
    x0 = torch.tensor([[[[0.2, 0.6]]]], dtype=torch.float64)  # (1, 1, 1, 2) pixels
    g, f = _linear([[1.0, 0.0], [0.0, 1.0]]), _linear([[2.0, -1.0], [0.5, 1.0]])
    k, k0, lam = torch.tensor([0]), torch.tensor([1]), 0.5
    # L = CE((0.2, 0.6), 0) + lam * f_1 = log(e^0.2 + e^0.6) - 0.2 + 0.5 * (0.5 * 0.2 + 0.6)
    value = translation_objective(g(x0), f(x0), k, k0, lam)
    assert math.isclose(float(value), math.log(math.exp(0.2) + math.exp(0.6)) - 0.2 + 0.35, rel_tol=1e-12)
    # dL/dx = W_g^T (softmax - e_k) + lam * W_f[k0] = (p0 - 1 + 0.25, p1 + 0.5)
    p0 = math.exp(0.2) / (math.exp(0.2) + math.exp(0.6))
    grad = [p0 - 1 + 0.25, (1 - p0) + 0.5]
    norm = math.hypot(*grad)
    step = 0.1
    want = [min(max(v - step * gv / (norm + 1e-10), 0.0), 1.0) for v, gv in zip([0.2, 0.6], grad)]
    x, probs = translate(x0, g=g, f=f, gen_targets=k, seed_targets=k0, lam=lam, step_size=step, iters=1,
                         uniform=None)
    assert torch.allclose(x.view(-1), torch.tensor(want, dtype=torch.float64), atol=1e-12)
    z = torch.tensor(want)
    assert math.isclose(float(probs), float(torch.softmax(z, 0)[0]), rel_tol=1e-6)  # g's p_k of x*


def test_l2_step_is_per_sample_and_clamped():
    x = torch.full((2, 1, 1, 2), 0.5)
    grad = torch.tensor([[[[3.0, 4.0]]], [[[0.0, -10.0]]]])
    out = l2_step(x, grad, 1.0)
    assert torch.allclose(out.view(2, 2), torch.tensor([[0.0, 0.0], [0.5, 1.0]]))  # 0.5-0.6, 0.5-0.8 clamp to 0


def test_random_start_renormalises_channel_slices_over_the_set():
    u = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.full((6, 3, 4, 4), 0.5)
    r = random_start(x0, u) - x0  # no clamp bites: |r| <= 0.5
    for c in range(3):  # official renorm(dim=1): each channel slice of the whole set has norm 0.5
        assert math.isclose(float(r[:, c].norm()), 0.5, rel_tol=1e-5)
    scale = 0.5 / (u - 0.5).transpose(0, 1).flatten(1).norm(dim=1)
    assert torch.allclose(r, (u - 0.5) * scale.view(1, 3, 1, 1), atol=1e-6)


def test_rejection_rule():
    probs = torch.tensor([0.95, 0.95, 0.5, 0.9])
    coin = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert accepted(probs, 0.9, coin).tolist() == [True, False, False, True]  # >= gamma, and the coin


def test_deferred_oversampler(erm_run):
    cfg, data, recipe = tiny_recipe(**_m2m(erm_run, start_epoch=1))
    sampler = recipe.sampler
    labels = data.train.labels
    assert sorted(sampler.indices(0).tolist()) == list(range(len(labels)))  # instance sampling before
    draws = np.concatenate([sampler.indices(e) for e in range(1, 40)])
    freq = np.bincount(labels[draws], minlength=data.num_classes) / len(draws)
    assert np.allclose(freq, 1 / data.num_classes, atol=0.03)  # class-balanced with replacement after
    assert len(sampler.indices(1)) == len(labels)
    assert recipe.method.plain_ce_epochs() == 1
    _, _, plain = tiny_recipe(**_m2m(erm_run, start_epoch=1, oversample=False))
    assert np.array_equal(plain.sampler.indices(3), sampler.base.indices(3))


def _batch(data, n=16):
    pos = np.arange(len(data.train.labels))[::max(len(data.train.labels) // n, 1)][:n]
    images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return (images - mean) / std, torch.from_numpy(data.train.labels[pos])


def test_generation_fills_slots_and_keeps_labels(erm_run):
    _, data, recipe = tiny_recipe(**_m2m(erm_run, start_epoch=0, gamma=0.0, beta=0.0))
    method, model = recipe.method, recipe.model
    images, target = _batch(data)
    model.train()
    out = method.generate(model, images, target, torch.Generator().manual_seed(3))
    s = method.last_stats
    # gamma 0 and beta 0 (p_accept 1 for any larger seed class): every valid slot is accepted
    assert s["slots"] > 0 and s["accepted"] == s["slots"]
    changed = (out != images).flatten(1).any(1)
    assert int(changed.sum()) == s["accepted"]
    assert not changed[target == 0].any()  # the largest class is never a target
    assert model.training  # f back in train mode
    again = method.generate(model, images, target, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the loop's generator decides every draw
    _, _, strict = tiny_recipe(**_m2m(erm_run, start_epoch=0, gamma=1.0, beta=0.0))
    same = strict.method.generate(strict.model, images, target, torch.Generator().manual_seed(3))
    assert strict.method.last_stats["accepted"] == 0 and torch.equal(same, images)
    step = method.training_step(model, split_forward(model), images, target, recipe.loss,
                                torch.Generator().manual_seed(3))
    assert step.logits.shape == (len(target), data.num_classes) and torch.isfinite(step.loss)


def test_tiny_run_generates_and_resumes_exactly(erm_run, tmp_path, monkeypatch):
    cfg = tiny_config(**{**_m2m(erm_run, start_epoch=1, gamma=0.5, beta=0.9, attack_iters=2), "train.epochs": 3,
                         "train.milestones": [2]})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=1, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    plain = tiny_config(**{"train.epochs": 3, "train.milestones": [2]})
    train_run(config_from_dict(plain), tmp_path / "ce", arrays=tiny_arrays(), evaluate=False)
    c, _ = last_checkpoints(tmp_path / "ce", tmp_path / "ce")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # generation changed training


def _one_line(err: Exception, *words):
    text = str(err)
    assert "\n" not in text and all(w in text for w in words), text


def test_classifier_path_errors(erm_run, tmp_path):
    cases = {"missing": tmp_path / "nope.pt", "folder": tmp_path / "empty_dir", "garbage": tmp_path / "bad.pt"}
    cases["folder"].mkdir()
    cases["garbage"].write_bytes(b"not a checkpoint")
    for name, path in cases.items():
        out = tmp_path / f"run_{name}"
        with pytest.raises(LongtailError) as err:
            train_run(config_from_dict(tiny_config(**_m2m(path))), out, arrays=tiny_arrays())
        _one_line(err.value, "method.params.classifier", str(path))
        assert not out.exists()  # nothing half-written
    # a g of another class count does not fit this data
    other = tmp_path / "g3"
    arrays3 = tiny_arrays(num_classes=3)
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), other, arrays=arrays3, evaluate=False)
    with pytest.raises(LongtailError) as err:
        tiny_recipe(**_m2m(other))
    _one_line(err.value, "method.params.classifier")
    # a run folder works as well as its checkpoint file
    _, _, recipe = tiny_recipe(**_m2m(erm_run))
    assert recipe.method.g is not None and not recipe.method.g.training
    assert all(not p.requires_grad for p in recipe.method.g.parameters())


@pytest.mark.parametrize("over, key", [
    ({"beta": 1.0}, "beta"), ({"gamma": 1.5}, "gamma"), ({"lam": -1}, "lam"), ({"step_size": 0}, "step_size"),
    ({"attack_iters": 0}, "attack_iters"), ({"start_epoch": 2}, "start_epoch"), ({"random_start": "yes"}, "random_start"),
    ({"oversample": 1}, "oversample"), ({"classifier": ""}, "classifier"), ({"unknown": 1}, "unknown"),
])
def test_bad_params(erm_run, over, key):
    with pytest.raises(ConfigError) as err:
        tiny_recipe(**_m2m(erm_run, **over))
    _one_line(err.value, key)


def test_mixup_is_refused(erm_run):
    with pytest.raises(ConfigError) as err:
        tiny_recipe(**{**_m2m(erm_run), "train.mixup_alpha": 0.2})
    _one_line(err.value, "mixup_alpha")
