"""IB and IB-focal (methods/ib.py, losses/ib.py): the influence-balanced loss by hand, its
gradients, the CE phase before the switch, training, resume, branching off CE, bad parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses import inverse_frequency_weights
from longtail.losses.ib import influence_balanced_loss
from longtail.methods import build_recipe
from longtail.runs import train_run

LOGITS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
TARGET = torch.tensor([0, 1])
FEATURES = torch.tensor([[1.0, -2.0], [0.5, 0.5]])


def _by_hand(alpha, eps, weight=(1.0, 1.0), gamma=0.0):
    # sample 0: z = (1, 0), y = 0: 1 - p_y = 1/(1+e), ||p - y||_1 = 2/(1+e), ||h||_1 = 3
    # sample 1: z = (0, 2), y = 1: 1 - p_y = 1/(1+e^2), ||p - y||_1 = 2/(1+e^2), ||h||_1 = 1
    rows = [(math.log(1 + math.exp(-1)), 2 / (1 + math.e), 3.0, weight[0]),
            (math.log(1 + math.exp(-2)), 2 / (1 + math.e ** 2), 1.0, weight[1])]
    total = 0.0
    for ce, g, f, w in rows:
        l = w * ce
        total += (1 - math.exp(-l)) ** gamma * l * alpha / (g * f + eps)
    return total / 2


def test_ib_loss_hand_computed():
    value = influence_balanced_loss(LOGITS, TARGET, FEATURES, alpha=1000.0, epsilon=1e-3)
    assert math.isclose(float(value), _by_hand(1000.0, 1e-3), rel_tol=1e-5)
    w = torch.tensor([0.5, 1.5])
    value = influence_balanced_loss(LOGITS, TARGET, FEATURES, alpha=2.0, epsilon=0.1, class_weight=w)
    assert math.isclose(float(value), _by_hand(2.0, 0.1, (0.5, 1.5)), rel_tol=1e-5)  # plain mean over B


def test_ib_focal_hand_computed_and_gamma_zero_is_ib():
    w = torch.tensor([0.5, 1.5])
    value = influence_balanced_loss(LOGITS, TARGET, FEATURES, alpha=10.0, epsilon=1e-3, gamma=1.0, class_weight=w)
    # the focal "probability" is exp(-w_y CE), from the weighted CE (official quirk)
    assert math.isclose(float(value), _by_hand(10.0, 1e-3, (0.5, 1.5), gamma=1.0), rel_tol=1e-5)
    ib = influence_balanced_loss(LOGITS, TARGET, FEATURES, alpha=10.0, epsilon=1e-3, class_weight=w)
    focal0 = influence_balanced_loss(LOGITS, TARGET, FEATURES, alpha=10.0, epsilon=1e-3, gamma=0.0, class_weight=w)
    assert torch.equal(ib, focal0)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_ib_gradcheck(gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    features = (torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    target = torch.tensor([0, 1, 2, 2, 0])
    w = torch.tensor([0.2, 0.8, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z, h: influence_balanced_loss(z, target, h, alpha=3.0, epsilon=1e-3, gamma=gamma, class_weight=w),
        (logits, features))


def test_influence_is_not_detached_by_default():
    features = FEATURES.clone().requires_grad_(True)
    influence_balanced_loss(LOGITS, TARGET, features).backward()
    assert features.grad.abs().sum() > 0  # the official factor carries the gradient into ||h||_1
    features.grad = None
    logits = LOGITS.double().requires_grad_(True)
    influence_balanced_loss(logits, TARGET, features.double(), alpha=2.0, detach=True).backward()
    assert features.grad is None or features.grad.abs().sum() == 0
    # detached: the gradient of (1/B) sum_i CE_i * ib_i with ib_i held fixed
    with torch.no_grad():
        g = (torch.softmax(logits, 1) - F.one_hot(TARGET, 2)).abs().sum(1)
        ib = 2.0 / (g * FEATURES.double().abs().sum(1) + 1e-3)
    z = LOGITS.double().requires_grad_(True)
    (F.cross_entropy(z, TARGET, reduction="none") * ib).mean().backward()
    assert torch.allclose(logits.grad, z.grad, rtol=1e-12)


def _recipe(**over):
    cfg = config_from_dict(tiny_config(**{"method.name": "ib", **over}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    return cfg, data, build_recipe(cfg, data)


def _step(method, recipe, epoch):
    model = recipe.model
    method.on_epoch_start(epoch, recipe.loss)

    def forward(images):
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        return pooled, model.head(pooled)

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    out = method.training_step(model, forward, images, target, recipe.loss, torch.Generator().manual_seed(0))
    features, logits = forward(images)
    return out, features, logits, target


def test_ce_before_the_switch_and_ib_after():
    cfg, data, recipe = _recipe(**{"method.params": {"start_epoch": 1}})
    method = recipe.method
    recipe.model.eval()  # same BN statistics for the reference pass
    out, _, logits, target = _step(method, recipe, 0)
    assert torch.allclose(out.loss, F.cross_entropy(logits, target), atol=1e-6)  # plain CE phase
    out, features, logits, target = _step(method, recipe, 1)
    want = influence_balanced_loss(logits, target, features, alpha=1000.0, epsilon=1e-3,
                                   class_weight=inverse_frequency_weights(data.class_counts))
    assert torch.allclose(out.loss, want, rtol=1e-5)
    assert method.plain_ce_epochs() == 1
    assert method.ib_weight.sum().item() == pytest.approx(data.num_classes)  # normalised to sum C


def test_defaults_and_plain_ce_epochs():
    _, _, recipe = _recipe()
    m = recipe.method
    assert (m.start_epoch, m.alpha, m.epsilon, m.gamma, m.class_weight, m.detach) == (
        1, 1000.0, 1e-3, 0.0, "inverse_frequency", False)  # start: the first milestone of tiny_config
    _, _, recipe = _recipe(**{"method.name": "ib_focal"})
    assert recipe.method.gamma == 1.0
    _, _, recipe = _recipe(**{"loss.name": "focal"})
    assert recipe.method.plain_ce_epochs() == 0  # not CE before the switch: no branching
    _, _, recipe = _recipe(**{"method.params": {"class_weight": "none"}})
    assert recipe.method.ib_weight is None


@pytest.mark.parametrize("name", ["ib", "ib_focal"])
def test_trains_and_resumes_exactly(name, tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": name, "method.params": {"start_epoch": 1}, "train.milestones": [1]})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())


def test_branch_off_ce_with_the_ib_lr_drop_equals_scratch(tmp_path):
    base = {"train.epochs": 3, "train.milestones": [2]}
    arrays = tiny_arrays()
    train_run(config_from_dict(tiny_config(**base, **{"train.save_epochs": [1, 2]})), tmp_path / "ce",
              arrays=arrays, evaluate=False)
    ib = tiny_config(**{**base, "train.milestones": [1, 2]}, **{"method.name": "ib",
                                                               "method.params": {"start_epoch": 1}})
    train_run(config_from_dict(ib), tmp_path / "scratch", arrays=arrays, evaluate=False)
    train_run(config_from_dict(ib), tmp_path / "branch", arrays=arrays, evaluate=False,
              branch_from=tmp_path / "ce/checkpoints/epoch1.pt")
    a = safe_torch_load(tmp_path / "scratch/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "branch/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # at epoch 2 the LR of epoch 1 already differs (IB lowered it): refused
    late = tiny_config(**{**base, "train.milestones": [1, 2]}, **{"method.name": "ib",
                                                                 "method.params": {"start_epoch": 2}})
    with pytest.raises(ConfigError, match="the configs differ in train.milestones"):
        train_run(config_from_dict(late), tmp_path / "bad", arrays=arrays, evaluate=False,
                  branch_from=tmp_path / "ce/checkpoints/epoch2.pt")


@pytest.mark.parametrize("params, match", [
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"epsilon": -1.0}, "epsilon must be a finite number > 0"),
    ({"gamma": -1.0}, "gamma must be a finite number >= 0"),
    ({"class_weight": "balanced"}, "class_weight must be one of 'inverse_frequency', 'effective_number', 'none'"),
    ({"beta": 1.0}, "beta must be a finite number >= 0 and < 1"),
    ({"detach": "yes"}, "detach must be true or false"),
    ({"start_epoch": 2}, r"start_epoch must be an integer in \[0, train.epochs = 2\)"),
    ({"start_epoch": 1.5}, "start_epoch must be an integer"),
    ({"alpah": 1.0}, "has no parameter 'alpah'"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match) as err:
        _recipe(**{"method.params": params})
    assert "\n" not in str(err.value)


def test_mixup_cutmix_and_missing_milestone_are_refused():
    with pytest.raises(ConfigError, match="does not take the loop's mixup / CutMix"):
        _recipe(**{"train.mixup_alpha": 1.0})
    # from start_epoch on IB's own step never calls the base step, where CutMix happens: refused, not ignored
    with pytest.raises(ConfigError, match="set train.cutmix_alpha: 0$") as err:
        _recipe(**{"train.cutmix_alpha": 1.0})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs start_epoch"):
        _recipe(**{"train.milestones": []})
