"""TDE (Tang et al., NeurIPS 2020): the causal-norm head, its TDE inference, the `tde` method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.eval.predict import predict
from longtail.io import safe_torch_load
from longtail.methods import build_recipe
from longtail.models import build_model
from longtail.models.causal_norm import CausalNormHead
from longtail.runmodel import load_run_model
from longtail.runs import train_run


def _head(**kw) -> CausalNormHead:
    torch.manual_seed(0)
    return CausalNormHead(in_features=kw.pop("in_features", 8), num_classes=kw.pop("num_classes", 3), **kw)


def _official(head: CausalNormHead, x: torch.Tensor, embed: torch.Tensor, *, use_effect: bool) -> torch.Tensor:
    """The official Causal_Norm_Classifier.forward, transcribed loop by loop (torch.split per head)."""
    hd = head.in_features // head.num_head
    normed_w = torch.cat([w / (torch.norm(w, 2, 1, keepdim=True) + head.gamma) for w in torch.split(head.weight, hd, 1)], 1)
    normed_x = torch.cat([v / torch.norm(v, 2, 1, keepdim=True) for v in torch.split(x, hd, 1)], 1)
    scale = head.tau / head.num_head
    y = torch.mm(normed_x * scale, normed_w.t())
    if not use_effect:
        return y
    c = embed.view(1, -1)
    normed_c = torch.cat([v / torch.norm(v, 2, 1, keepdim=True) for v in torch.split(c, hd, 1)], 1)
    out = []
    for nx, nc, nw in zip(torch.split(normed_x, hd, 1), torch.split(normed_c, hd, 1), torch.split(normed_w, hd, 1)):
        cos = (nx * nc).sum(-1, keepdim=True) / torch.norm(nx, 2, 1, keepdim=True) / torch.norm(nc, 2, 1, keepdim=True)
        out.append(torch.mm((nx - cos * float(head.alpha) * nc) * scale, nw.t()))
    return sum(out)


# -- the head
def test_hand_computed_plain_and_tde_logits():
    # D = 4, two heads of 2; tau 4 -> scale 2; gamma 1; d along e1 in head 1 and e2 in head 2
    head = _head(in_features=4, num_classes=2, num_head=2, tau=4.0, gamma=1.0, alpha=2.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]))
        head.direction.copy_(torch.tensor([5.0, 0.0, 0.0, 3.0]))
    x = torch.tensor([[3.0, 4.0, 1.0, 0.0]])
    # heads of x: (0.6, 0.8), (1, 0); normed w: class 0 (2/3, 0 | 0, 1/2), class 1 (0, 1/2 | 1/2, 0)
    # plain: 2 * (0.6 * 2/3) = 0.8 ; 2 * (0.8 / 2 + 1 / 2) = 1.8
    head.train()
    head.update_direction = False
    assert torch.allclose(head(x), torch.tensor([[0.8, 1.8]]))
    # TDE: cos = (0.6, 0); head 1 becomes (0.6, 0.8) - 2 * 0.6 * (1, 0) = (-0.6, 0.8), head 2 unchanged
    head.eval()
    assert torch.allclose(head(x), torch.tensor([[2 * (-0.6 * 2 / 3), 1.8]]))
    assert torch.allclose(head.direction_cos(x), torch.tensor([[0.6, 0.0]]))
    head.alpha.fill_(1.0)
    assert torch.allclose(head(x), torch.tensor([[0.0, 1.8]]))


def test_alpha_zero_gives_the_plain_causal_norm_logits():
    head = _head(alpha=0.0)
    x = torch.randn(6, 8)
    head.train()
    plain = head(x)  # also moves d away from 0
    assert head.direction.abs().sum() > 0
    head.eval()
    assert torch.equal(head(x), head.logits(x))
    assert torch.allclose(head(x), plain, atol=1e-6)
    assert torch.allclose(plain, _official(head, x, head.direction, use_effect=False), atol=1e-5)


def test_tde_logits_match_the_official_forward():
    for num_head, alpha in ((1, 1.0), (2, 1.5), (4, 3.0)):
        head = _head(num_head=num_head, alpha=alpha, gamma=1 / 32)
        x, d = torch.randn(5, 8), torch.randn(8)
        head.direction.copy_(d)
        head.eval()
        assert torch.allclose(head(x), _official(head, x, d, use_effect=True), atol=1e-5)
        # per head: plain logit - alpha * cos_k * (the logit of the unit vector along d_k)
        nw = head.normalised_weight().view(3, num_head, -1)
        nd = F.normalize(d.view(num_head, -1), dim=-1)
        proj = head.scale * torch.einsum("kd,ckd->kc", nd, nw)  # (K, C)
        expected = head.logits(x) - alpha * head.direction_cos(x) @ proj
        assert torch.allclose(head(x), expected, atol=1e-5)


def test_direction_moves_as_the_official_moving_sum_in_training_mode_only():
    head = _head(mu=0.9)
    a, b = torch.randn(4, 8), torch.randn(6, 8)
    head.train()
    head(a)
    head(b)
    expected = 0.9 * a.mean(0) + b.mean(0)  # d <- mu d + batch mean (no (1 - mu) factor)
    assert torch.allclose(head.direction, expected, atol=1e-6)
    head.eval()
    head(torch.randn(3, 8))
    assert torch.allclose(head.direction, expected, atol=1e-6)
    head.train()
    head.update_direction = False
    head(torch.randn(3, 8))
    assert torch.allclose(head.direction, expected, atol=1e-6)


def test_zero_direction_gives_plain_logits_without_nan():
    head = _head(alpha=3.0).eval()
    x = torch.randn(4, 8)
    assert torch.equal(head(x), head.logits(x)) and torch.isfinite(head(x)).all()


def test_gradcheck_float64():
    head = _head(gamma=1 / 32).double()
    head.direction.copy_(torch.randn(8, dtype=torch.float64))
    head.update_direction = False
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    for mode in (True, False):
        head.train(mode)
        assert torch.autograd.gradcheck(lambda f, w: _with_weight(head, w, f), (x, head.weight.detach().clone()
                                                                               .requires_grad_(True)))


def _with_weight(head, weight, features):
    saved = head.weight
    try:
        del head.weight
        head.weight = weight
        return head(features)
    finally:
        del head.weight
        head.weight = saved


def test_head_registered_and_in_a_backbone():
    model = build_model("small_cnn", num_classes=3, in_channels=1, head="causal_norm", params={"width": 4})
    assert isinstance(model.head, CausalNormHead) and model.head.num_head == 2 and float(model.head.alpha) == 3.0
    assert {"fc.weight", "fc.direction", "fc.alpha"} <= set(model.state_dict())


@pytest.mark.parametrize("kw, match", [
    ({"num_head": 0}, "num_head must be a positive integer"),
    ({"num_head": 3}, "num_head must divide the feature width 8"),
    ({"num_head": 2.0}, "num_head must be a positive integer"),
    ({"tau": 0}, "tau must be a number > 0"),
    ({"gamma": -1}, "gamma must be a number >= 0"),
    ({"mu": 1.5}, r"mu must be a number in \[0, 1\]"),
    ({"alpha": -0.5}, "alpha must be a number >= 0"),
    ({"alpha": float("nan")}, "alpha must be a number >= 0"),
])
def test_bad_head_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        _head(**kw)


# -- the method
def _cfg(**over) -> dict:
    return tiny_config(**{"method.name": "tde", "method.params": {"alpha": 1.0}, **over})


def test_training_step_is_cross_entropy_on_the_causal_norm_logits():
    cfg = config_from_dict(_cfg())
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    model, method = recipe.model, recipe.method
    assert isinstance(model.head, CausalNormHead) and float(model.head.alpha) == 1.0
    assert method.plain_ce_epochs() == 0 and type(method).rebalancing
    method.on_epoch_start(0, recipe.loss)
    method.set_train_mode(model)
    images = torch.randn(6, data.channels, *data.train.batch(np.arange(1)).shape[1:3])
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    forward = lambda im: (lambda p: (p, model.head(p)))(model.forward_head(model.forward_features(im), pre_logits=True))
    out = method.training_step(model, forward, images, target, recipe.loss, torch.Generator())
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, target))
    assert model.head.direction.abs().sum() > 0


def test_mu_schedule_lr_follows_the_official_formula():
    cfg = config_from_dict(_cfg(**{"method.params": {"mu_schedule": "lr", "mu": 0.9}, "train.lr": 0.01,
                                   "train.warmup_epochs": 0, "train.milestones": [1]}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    recipe = build_recipe(cfg, data)
    method = recipe.method
    method.on_epoch_start(0, recipe.loss)  # lr 0.01: 1 - 0.1 * min(0.5, 1)
    method.set_train_mode(recipe.model)
    assert recipe.model.head.mu == pytest.approx(0.95)
    method.on_epoch_start(1, recipe.loss)  # lr 1e-4
    method.set_train_mode(recipe.model)
    assert recipe.model.head.mu == pytest.approx(1 - 0.1 * 0.005)


@pytest.mark.parametrize("params, match", [
    ({"num_head": 3}, "num_head must divide the feature width 8"),
    ({"tau": -1}, "tau must be a number > 0"),
    ({"gamma": "x"}, "gamma must be a number >= 0"),
    ({"mu": -0.1}, r"mu must be a number in \[0, 1\]"),
    ({"alpha": -1}, "alpha must be a number >= 0"),
    ({"mu_schedule": "cosine"}, "mu_schedule must be one of fixed, lr"),
    ({"alpha_select": "test"}, "alpha_select must be one of none, val"),
    ({"alpha_grid": []}, "alpha_grid must be a non-empty list"),
    ({"alpha_grid": [1, -1]}, "alpha_grid must be a non-empty list of numbers >= 0"),
    ({"alpha_select": "val"}, r"alpha_select 'val' needs a validation split"),
    ({"nonsense": 1}, "nonsense"),
])
def test_bad_method_parameters_give_one_line_config_errors(params, match):
    cfg = config_from_dict(_cfg(**{"method.params": params}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match=match) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)


def test_other_heads_are_refused():
    cfg = config_from_dict(_cfg(**{"model.head": "cosine"}))
    with pytest.raises(ConfigError, match="model.head must be linear or causal_norm"):
        build_recipe(cfg, build_data(cfg.data, arrays=tiny_arrays()))


def test_trains_and_resumes_exactly_with_the_direction(tmp_path, monkeypatch):
    cfg = _cfg(**{"train.milestones": [2]})
    full, cut, before = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                         evaluate=False)
    assert before["model"]["fc.direction"].abs().sum() > 0  # d saved after epoch 1
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["fc.direction"], before["model"]["fc.direction"])
    assert float(a["model"]["fc.alpha"]) == 1.0 and a["method"] == b["method"] == {}


def test_alpha_chosen_on_validation_and_used_by_every_prediction(tmp_path):
    grid = [0.0, 0.5, 2.0]
    cfg = config_from_dict(_cfg(**{"data.val_per_class": 2, "train.epochs": 1,
                                   "method.params": {"alpha_select": "val", "alpha_grid": grid}}))
    arrays = tiny_arrays()
    train_run(cfg, tmp_path / "run", arrays=arrays)
    ckpt = safe_torch_load(tmp_path / "run/checkpoints/last.pt")
    sel = ckpt["method"]["selection"]
    assert sel["grid"] == grid and sel["epoch"] == 1 and len(sel["val_top1"]) == 3
    assert sel["alpha"] == grid[int(np.argmax(sel["val_top1"]))]
    assert float(ckpt["model"]["fc.alpha"]) == sel["alpha"]
    # the rebuilt network (eval, predict, export) predicts with TDE at the chosen alpha
    model, _, _ = load_run_model(tmp_path / "run")
    assert float(model.head.alpha) == sel["alpha"] and not model.training
    data = build_data(cfg.data, arrays=arrays)
    out = predict(model, data.test, mean=data.mean, std=data.std, features=True)
    feats = torch.from_numpy(out["features"])
    tde = model.head.logits(feats, sel["alpha"]).detach().numpy()
    assert np.allclose(out["logits"], tde, atol=1e-5)
    saved = np.load(tmp_path / "run/predictions.npz")["logits"]
    assert np.allclose(saved, tde, atol=1e-4)
    # the validation accuracies recorded are those of the grid's alphas
    vout = predict(model, data.val, mean=data.mean, std=data.std, features=True)
    vf, vl = torch.from_numpy(vout["features"]), torch.from_numpy(vout["labels"])
    for a, acc in zip(grid, sel["val_top1"]):
        assert math.isclose(float((model.head.logits(vf, a).argmax(1) == vl).double().mean()) * 100, acc,
                            abs_tol=1e-9)
