"""Weight balancing (Alshammari et al., CVPR 2022): the MaxNorm constraint (optim/constraints.py),
its config section and hooks, the stage-2 loss `cb_softmax_bce` and the `weight_balancing` method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict, load_config
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses import build_loss
from longtail.methods import build_recipe
from longtail.optim.constraints import MaxNorm, build_constraint, project_rows, row_norms
from longtail.runs import train_run

ROOT = Path(__file__).resolve().parents[1]


class _Net(torch.nn.Module):
    """A backbone convolution and a linear head, as the Classifier contract names them."""

    def __init__(self, head_weight: torch.Tensor):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 2)
        self.head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
            self.head.bias.copy_(torch.tensor([10.0, -10.0, 5.0][:head_weight.shape[0]]))
            self.conv.weight.copy_(torch.tensor([[[[3.0, 0.0], [4.0, 0.0]]], [[[0.3, 0.4], [0.0, 0.0]]]]))


# ----------------------------------------------------------------------------- projection


def test_projection_hand_computed():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # norms 5, 0.5, 0
    project_rows(w, 1.0, 2.0)
    assert torch.allclose(w, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))  # above: scaled to 1; below: kept
    conv = torch.tensor([[[[3.0, 0.0], [4.0, 0.0]]], [[[0.3, 0.4], [0.0, 0.0]]]])  # per output filter over (1, 2, 2)
    project_rows(conv, 2.0, 2.0)
    assert torch.allclose(conv[0].flatten(), torch.tensor([1.2, 0.0, 1.6, 0.0]))
    assert torch.equal(conv[1].flatten(), torch.tensor([0.3, 0.4, 0.0, 0.0]))
    l1 = torch.tensor([[3.0, -4.0]])  # L1 norm 7 -> 3.5
    project_rows(l1, 3.5, 1.0)
    assert torch.allclose(l1, torch.tensor([[1.5, -2.0]]))


def test_relative_radius_is_official_min_plus_thresh_times_range():
    # row norms 5, 0.5, 1: r = 0.5 + 0.1 * (5 - 0.5) = 0.95 (MaxNorm_via_PGD.setPerLayerThresh)
    net = _Net(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.6, 0.8]]))
    c = MaxNorm(net, thresh=0.1)
    assert list(c.radii) == ["head.weight"]  # the head's weight only: not its bias, not the backbone
    assert c.radii["head.weight"] == pytest.approx(0.95)
    bias, conv = net.head.bias.clone(), net.conv.weight.clone()
    c.project(net)
    assert torch.allclose(row_norms(net.head.weight, 2.0), torch.tensor([0.95, 0.5, 0.95]))
    assert torch.allclose(net.head.weight[0], torch.tensor([0.57, 0.76]))  # direction kept
    assert torch.equal(net.head.bias, bias) and torch.equal(net.conv.weight, conv)
    assert MaxNorm(net, thresh=0.0).radii["head.weight"] == pytest.approx(0.5)
    assert MaxNorm(net, thresh=1.0).radii["head.weight"] == pytest.approx(0.95)  # already projected: max 0.95


def test_absolute_radius_and_every_layer():
    net = _Net(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    c = MaxNorm(net, thresh=1.0, mode="absolute", layers="all")
    assert sorted(c.radii) == ["conv.weight", "head.weight"] and set(c.radii.values()) == {1.0}
    c.project(net)
    assert torch.allclose(row_norms(net.conv.weight, 2.0), torch.tensor([1.0, 0.5]))
    assert torch.allclose(row_norms(net.head.weight, 2.0), torch.tensor([1.0, 0.5]))


def test_projection_equals_official_formula_on_random_weights():
    # MaxNorm_via_PGD.PGD at tau = 1, p = 2: rows with norm > r multiplied by r / norm
    torch.manual_seed(0)
    w = torch.randn(7, 5) * torch.linspace(0.1, 3, 7).unsqueeze(1)
    norms = w.norm(dim=1)
    r = float(norms.min() + 0.1 * (norms.max() - norms.min()))
    expected = w.clone()
    idx = norms > r
    expected[idx] = w[idx] * (r / norms[idx]).unsqueeze(1)
    project_rows(w, r, 2.0)
    assert torch.allclose(w, expected, atol=1e-7)
    assert (row_norms(w, 2.0) <= r + 1e-6).all()


@pytest.mark.parametrize("params, message", [
    ({"thresh": 1.5}, "thresh must be in \\[0, 1\\] with mode relative"),
    ({"thresh": -0.1}, "thresh must be a finite number >= 0"),
    ({"thresh": 0, "mode": "absolute"}, "thresh must be a finite number > 0"),
    ({"thresh": True}, "thresh must be a finite number"),
    ({"p": 0.5}, "p must be a number >= 1"),
    ({"mode": "relativ"}, "mode must be one of .relative., .absolute."),
    ({"layers": "backbone"}, "layers must be one of .head., .all."),
    ({"every": "batch"}, "every must be one of .epoch., .step."),
    ({"treshold": 0.1}, "max_norm has no parameter 'treshold' \\(did you mean 'thresh'\\?\\)"),
])
def test_bad_constraint_parameters(params, message):
    net = _Net(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    with pytest.raises(ValueError, match=message):
        build_constraint("max_norm", params, net)


def test_constraint_config_validation():
    assert config_from_dict(tiny_config()).constraint.name == "none"
    with pytest.raises(ConfigError, match="config key 'constraint.name' must be one of none, max_norm, got "
                                          "'maxnorm' \\(did you mean 'max_norm'\\?\\)"):
        config_from_dict(tiny_config(**{"constraint.name": "maxnorm"}))
    with pytest.raises(ConfigError, match="unknown config key 'constraint.param'"):
        config_from_dict(tiny_config(**{"constraint.param": {}}))
    data = build_data(config_from_dict(tiny_config()).data, arrays=tiny_arrays())
    for over, message in [
        ({"constraint.name": "max_norm", "constraint.params": {"thresh": 2}},
         "^constraint 'max_norm': thresh must be in \\[0, 1\\] with mode relative, got 2$"),
        ({"constraint.name": "max_norm", "constraint.params": {"every": "iteration"}},
         "^constraint 'max_norm': every must be one of .epoch., .step."),
        ({"constraint.params": {"thresh": 0.1}}, "^constraint 'none': takes no params, got thresh$"),
    ]:
        cfg = config_from_dict(tiny_config(**over))
        with pytest.raises(ConfigError, match=message) as err:
            build_recipe(cfg, data)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- loss


def test_cb_softmax_bce_hand_computed():
    # counts (3, 1), beta 0.5: w = (4/7, 1) normalised to sum 2 -> (8/11, 14/11)
    loss = build_loss("cb_softmax_bce", {"beta": 0.5}, class_counts=[3, 1])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    # sample 0: p = (1/4, 3/4), y = 1: BCE terms -log(3/4) (negative class) and -log(3/4) (positive)
    # sample 1: p = (1/2, 1/2), y = 0: two terms log 2; mean over B * C = 4 elements
    expected = (14 / 11 * 2 * math.log(4 / 3) + 8 / 11 * 2 * math.log(2)) / 4
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6)  # float32 weights


def test_cb_softmax_bce_equals_official_expression():
    # CB_loss(labels, logits, counts, C, "softmax", beta, gamma): F.binary_cross_entropy(softmax, one-hot, weight=W)
    torch.manual_seed(0)
    counts = [50, 20, 5, 1]
    logits, target = torch.randn(6, 4) * 3, torch.tensor([0, 1, 2, 3, 3, 0])
    n = torch.tensor(counts, dtype=torch.float64)
    w = (1 - 0.9999) / (1 - 0.9999 ** n)
    w = (w / w.sum() * 4).float()
    weights = w[target].unsqueeze(1).repeat(1, 4)
    official = F.binary_cross_entropy(logits.softmax(1), F.one_hot(target, 4).float(), weight=weights)
    ours = build_loss("cb_softmax_bce", class_counts=counts)(logits, target)
    assert torch.allclose(ours, official, rtol=1e-6)


def test_cb_softmax_bce_gradcheck_and_class_weight():
    loss = build_loss("cb_softmax_bce", {"beta": 0.9}, class_counts=[5, 3, 1]).double()
    logits = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    target = torch.tensor([0, 1, 2, 2, 0])
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))
    plain = loss(logits, target)
    loss.set_class_weight(torch.tensor([1.0, 1.0, 3.0]))
    assert not torch.allclose(loss(logits, target), plain)
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\)"):
        build_loss("cb_softmax_bce", {"beta": 1.0}, class_counts=[5, 3, 1])


def test_cb_softmax_bce_under_bf16_autocast_is_float32():
    loss = build_loss("cb_softmax_bce", class_counts=[5, 3, 1])
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ----------------------------------------------------------------------------- method and runs


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb_stage1")
    cfg = config_from_dict(tiny_config(**{"train.epochs": 1, "train.weight_decay": 5e-3}))
    train_run(cfg, root / "s1", arrays=tiny_arrays(), evaluate=False)
    return root / "s1" / "checkpoints" / "last.pt"


def _wb_config(stage1_path, **over) -> dict:
    base = {"method.name": "weight_balancing", "method.params": {"stage1": str(stage1_path)},
            "loss.name": "cb_softmax_bce", "train.weight_decay": 0.1, "train.lr": 0.05,
            "train.lr_schedule": "cosine", "train.warmup_epochs": 0,
            "constraint": {"name": "max_norm", "params": {"thresh": 0.1}}}
    base.update(over)
    return tiny_config(**base)


HEAD_W, HEAD_B = "fc.weight", "fc.bias"  # small_cnn's head (`model.head`) is its `fc` layer


def _head_radius(stage1_path) -> float:
    w = safe_torch_load(stage1_path)["model"][HEAD_W]
    norms = w.norm(dim=1)
    return float(norms.min() + 0.1 * (norms.max() - norms.min()))


@pytest.mark.parametrize("every", ["step", "epoch"])
def test_weight_balancing_trains_the_head_within_the_ball(stage1, tmp_path, every):
    calls = []
    original = MaxNorm.project

    def counted(self, model):
        calls.append(1)
        original(self, model)

    MaxNorm.project = counted
    try:
        cfg = _wb_config(stage1, constraint={"name": "max_norm", "params": {"thresh": 0.1, "every": every}})
        train_run(config_from_dict(cfg), tmp_path / "wb", arrays=tiny_arrays(), evaluate=False)
    finally:
        MaxNorm.project = original
    data = build_data(config_from_dict(cfg).data, arrays=tiny_arrays())
    steps = math.ceil(len(data.train) / 16)
    assert len(calls) == (2 * steps if every == "step" else 2)
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "wb/checkpoints/last.pt")["model"]
    r = _head_radius(stage1)
    assert (after[HEAD_W].norm(dim=1) <= r * (1 + 1e-6)).all()
    assert before[HEAD_W].norm(dim=1).max() > 1.5 * r  # the constraint binds: stage-1 rows lay far outside
    assert not torch.equal(after[HEAD_B], before[HEAD_B])  # bias trains, unconstrained
    frozen = [k for k in before if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # backbone weights frozen
    moved = [k for k in before if "running_mean" in k]
    assert any(not torch.equal(before[k], after[k]) for k in moved)  # BN statistics re-estimated (official)


def test_constraint_applies_to_every_method_every_layer(tmp_path):
    cfg = tiny_config(constraint={"name": "max_norm", "params": {"thresh": 0.05, "mode": "absolute",
                                                                  "layers": "all", "every": "step"}})
    train_run(config_from_dict(cfg), tmp_path / "ce", arrays=tiny_arrays(), evaluate=False)
    model = safe_torch_load(tmp_path / "ce/checkpoints/last.pt")["model"]
    weights = {k: v for k, v in model.items() if k.endswith("weight") and v.dim() >= 2}
    assert len(weights) >= 2
    for v in weights.values():
        assert (v.reshape(v.shape[0], -1).norm(dim=1) <= 0.05 * (1 + 1e-6)).all()


def test_weight_balancing_resumes_exactly(stage1, tmp_path, monkeypatch):
    cfg = _wb_config(stage1)
    full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(), evaluate=False)
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_weight_balancing_keeps_the_stage1_head(stage1):
    cfg = config_from_dict(_wb_config(stage1))
    data = build_data(cfg.data, arrays=tiny_arrays())
    recipe = build_recipe(cfg, data)
    before = safe_torch_load(stage1)["model"]
    assert torch.equal(recipe.model.head.weight, before[HEAD_W])  # fine-tuned, not re-initialised (cRT)
    trainable = {n for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert trainable == {HEAD_W, HEAD_B}
    assert recipe.method.plain_ce_epochs() == 0 and recipe.method.stage == 2
    assert recipe.method.constraint.radii[HEAD_W] == pytest.approx(_head_radius(stage1), rel=1e-6)


def test_constraint_refused_for_post_hoc_methods(stage1):
    cfg = config_from_dict(tiny_config(**{"method.name": "ncm", "method.params": {"stage1": str(stage1)},
                                          "constraint": {"name": "max_norm"}}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match="constraint 'max_norm' needs a method that trains; 'ncm' is post-hoc"):
        build_recipe(cfg, data)


@pytest.mark.parametrize("path", ["configs/cifar10_lt/wb_stage1.yaml", "configs/cifar10_lt/wb.yaml",
                                  "configs/cifar10_lt_full/wb_stage1.yaml", "configs/cifar10_lt_full/wb.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(ROOT / path)
    first = (ROOT / path).read_text().splitlines()[0]
    assert first.startswith("# longtail train " + path)
    if path.endswith("wb.yaml"):
        assert cfg.method.name == "weight_balancing" and cfg.constraint.name == "max_norm"
        assert cfg.loss.name == "cb_softmax_bce" and cfg.train.weight_decay == 0.1
    else:
        assert cfg.method.name == "standard" and cfg.loss.name == "ce" and cfg.train.weight_decay == 5e-3
