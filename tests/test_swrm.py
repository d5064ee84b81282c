"""The SWRM loss (Eq. 4) and the two-stage methods `swrm` / `dyswrm` (seed 001)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, interrupted_then_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict, load_config
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.losses.swrm import swrm_loss
from longtail.runs import train_run
from longtail.similarity.windows import weights_and_margins
from longtail.io import safe_torch_load

COUNTS = [50, 20, 5]
PROJ = [0.0, 1.0, 0.4]


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0])


# ----------------------------------------------------------------------------- the loss


def test_without_similarity_it_is_cross_entropy():
    logits, target = _batch()
    loss = build_loss("swrm", class_counts=COUNTS)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), atol=1e-7)


def test_zero_margins_is_weighted_cross_entropy():
    logits, target = _batch(torch.float64)
    loss = build_loss("swrm", {"window": 2, "beta": 0.0, "projection": PROJ}, class_counts=COUNTS).double()
    assert torch.equal(loss.swm_margin, torch.zeros(3, dtype=torch.float64))  # sim^0 = 1: log(mean 1) = 0
    w = loss.swr_weight
    assert not torch.allclose(w, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target, weight=w), rtol=1e-12)
    per = F.cross_entropy(logits, target, reduction="none")
    batch = build_loss("swrm", {"window": 2, "beta": 0.0, "projection": PROJ, "reduction": "batch"},
                       class_counts=COUNTS).double()
    assert torch.allclose(batch(logits, target), (w[target] * per).sum() / 6, rtol=1e-12)


def test_margin_is_added_to_the_target_logit_by_hand():
    # sample A: z = (1, 2, 0), y = 0, m_0 = 0.5: l_A = log(1 + e^(2 - 1.5) + e^(0 - 1.5))
    # sample B: z = (0, 1, 3), y = 2, m_2 = 0.2: l_B = log(1 + e^(0 - 3.2) + e^(1 - 3.2))
    l_a = math.log(1 + math.exp(0.5) + math.exp(-1.5))
    l_b = math.log(1 + math.exp(-3.2) + math.exp(-2.2))
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    w = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    m = torch.tensor([0.5, 9.0, 0.2], dtype=torch.float64)  # m_1 is never a target's margin here
    value = swrm_loss(logits, target, weights=w, margins=m)
    assert value.item() == pytest.approx((2 * l_a + 0.5 * l_b) / 2.5, rel=1e-12)
    assert swrm_loss(logits, target, weights=w, margins=m, reduction="batch").item() == pytest.approx(
        (2 * l_a + 0.5 * l_b) / 2, rel=1e-12)
    cw = torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64)  # RW / DRW class weight multiplies: t = (2, 2)
    assert swrm_loss(logits, target, weights=w, margins=m, class_weight=cw).item() == pytest.approx(
        (l_a + l_b) / 2, rel=1e-12)


def test_module_stores_eq2_and_eq3_and_round_trips():
    loss = build_loss("swrm", {"window": 2, "beta": 1.5, "projection": PROJ}, class_counts=COUNTS)
    w, m, order = weights_and_margins(torch.tensor(PROJ, dtype=torch.float64), COUNTS, window=2, beta=1.5)
    assert order.tolist() == [0, 2, 1]
    assert torch.allclose(loss.swr_weight, w.float()) and torch.allclose(loss.swm_margin, m.float())
    fresh = build_loss("swrm", {"window": 2, "beta": 1.5}, class_counts=COUNTS)
    fresh.load_state_dict(loss.state_dict())
    logits, target = _batch()
    assert torch.equal(fresh(logits, target), loss(logits, target))
    # a given similarity matrix changes the margins, not the weights
    sim = [[1.0, 0.5, 0.9], [0.5, 1.0, 0.2], [0.9, 0.2, 1.0]]
    other = build_loss("swrm", {"window": 2, "beta": 1.5, "projection": PROJ, "similarity": sim}, class_counts=COUNTS)
    assert torch.equal(other.swr_weight, loss.swr_weight) and not torch.allclose(other.swm_margin, loss.swm_margin)
    # window {0, 2} for class 0 (shift, W = 2 at the first position): m_0 = log((1 + 0.9^-1.5) / 2)
    assert other.swm_margin[0].item() == pytest.approx(math.log((1 + 0.9 ** -1.5) / 2), rel=1e-6)


def test_gradcheck_in_the_logits():
    logits, target = _batch(torch.float64)
    logits.requires_grad_(True)
    loss = build_loss("swrm", {"window": 2, "projection": PROJ}, class_counts=COUNTS).double()
    loss.set_class_weight(torch.tensor([0.5, 1.0, 2.0]))
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


def test_gradcheck_in_the_similarity_vector_and_the_module_gradient():
    logits, target = _batch(torch.float64)
    vector = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True)

    def f(v):
        w, m, _ = weights_and_margins(v, COUNTS, window=2, beta=1.0)
        return swrm_loss(logits, target, weights=w, margins=m)

    assert torch.autograd.gradcheck(f, (vector,))
    loss = build_loss("swrm", {"window": 2}, class_counts=COUNTS).double()
    loss.add_learnable_vector(vector.detach())
    loss.double()
    loss.learning = True
    loss(logits, target).backward()
    (expected,) = torch.autograd.grad(f(vector), vector)
    assert torch.allclose(loss.vector.grad, expected, rtol=1e-10)
    loss.learning = False  # not learning: the stored weights / margins, nothing reaches the vector
    assert not loss(logits, target).requires_grad


@pytest.mark.parametrize("params, match", [
    ({"window": 0}, "window must be an integer >= 1"),
    ({"beta": -1.0}, "beta must be"),
    ({"edge": "wrap"}, "edge must be one of"),
    ({"reduction": "sum"}, "reduction must be one of"),
    ({"projection": [0.0, 1.0]}, "projection must be 3 finite numbers"),
    ({"similarity": [[1.0] * 3] * 3}, "similarity needs a projection"),
    ({"projection": PROJ, "similarity": [[1.0, 0.0, 1.0]] * 3}, "entries in \\(0, 1\\]"),
])
def test_bad_loss_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        build_loss("swrm", params, class_counts=COUNTS)


# ----------------------------------------------------------------------------- the methods


def _cfg(method: str, **over) -> dict:
    return tiny_config(**{"train.epochs": 3, "loss": {"name": "swrm", "params": {"window": 3}},
                          "method": {"name": method, "params": {"start_epoch": 1}}, **over})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)


def test_swrm_switches_at_the_configured_epoch_and_survives_resume(tmp_path, monkeypatch):
    arrays = tiny_arrays()
    train_run(config_from_dict(_cfg("swrm")), tmp_path / "full", arrays=arrays, evaluate=False)
    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    assert a["method"]["switched_at"] == 1 and a["method"]["projection"].shape == (4,)
    assert not torch.equal(a["loss"]["swr_weight"], torch.ones(4))
    # cut before the switch: the resumed run computes the similarity at the switch itself
    before = interrupted_then_resumed(_cfg("swrm"), tmp_path / "a", monkeypatch, stop_after_epoch=0, arrays=arrays,
                                      evaluate=False)
    assert before["method"] == {"switched_at": -1}
    assert torch.equal(before["loss"]["swr_weight"], torch.ones(4))
    assert torch.equal(before["loss"]["swm_margin"], torch.zeros(4))
    b = safe_torch_load(tmp_path / "a/checkpoints/last.pt")
    assert _same(a["model"], b["model"]) and _same(a["loss"], b["loss"]) and _same(a["method"], b["method"])
    # cut after the switch: the similarity comes back from the checkpoint
    after = interrupted_then_resumed(_cfg("swrm"), tmp_path / "b", monkeypatch, stop_after_epoch=1, arrays=arrays,
                                      evaluate=False)
    assert after["method"]["switched_at"] == 1 and _same(after["method"], a["method"])
    c = safe_torch_load(tmp_path / "b/checkpoints/last.pt")
    assert _same(a["model"], c["model"]) and _same(a["loss"], c["loss"])
    # stage 1 is plain cross-entropy: epoch 0 equals a CE run's (same seed, LR and batches), epoch 1 does not
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), tmp_path / "ce", arrays=arrays, evaluate=False)

    def losses(run):
        return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    swrm_losses, ce_losses = losses(tmp_path / "full"), losses(tmp_path / "ce")
    assert swrm_losses[0] == pytest.approx(ce_losses[0], rel=1e-6)
    assert swrm_losses[1] != pytest.approx(swrm_losses[0], rel=1e-3)


def test_dyswrm_vector_moves_after_the_switch_only_and_resumes(tmp_path, monkeypatch):
    cfg = _cfg("dyswrm", **{"train.milestones": [3]})  # no LR decay in these 3 epochs
    full, cut, before = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                         evaluate=False)
    init = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.1  # train.seed 0, init_std 0.1
    assert torch.equal(before["loss"]["vector"], init)  # no gradient before the switch
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    moved = (a["loss"]["vector"] - init).abs().max().item()
    assert moved > 1e-3, moved
    n_model = len(a["model"]) - sum(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                    for k in a["model"])
    assert len(a["optimizer"]["param_groups"][0]["params"]) == n_model + 1  # the vector is optimised
    assert _same(a["model"], b["model"]) and _same(a["loss"], b["loss"])
    # the stored weights / margins are those of the final vector
    w, m, _ = weights_and_margins(a["loss"]["vector"], a["loss"]["class_counts"].numpy(), window=3, beta=1.0)
    assert torch.allclose(a["loss"]["swm_margin"], m.float(), atol=1e-5)


def test_swrm_with_another_run_as_similarity_model_and_cosine(tmp_path):
    from longtail.features import extract_features
    from longtail.similarity.projection import prototypes_from_features, tsne_projection
    from longtail.similarity.windows import cosine_similarity_from_prototypes

    digits = {"data": {"source": "digits", "imbalance_ratio": 5, "test_per_class": 5}, "train.epochs": 1}
    train_run(config_from_dict(tiny_config(**digits)), tmp_path / "ce", evaluate=False)
    cfg = _cfg("swrm", **{**digits, "method.params": {
        "start_epoch": 0, "similarity_run": str(tmp_path / "ce"), "similarity": "cosine"}})
    train_run(config_from_dict(cfg), tmp_path / "swrm", evaluate=False)
    state = safe_torch_load(tmp_path / "swrm/checkpoints/last.pt")
    fs = extract_features(tmp_path / "ce")
    protos = prototypes_from_features(fs["train"]["features"], fs["train"]["labels"], 10)
    assert np.allclose(state["method"]["projection"].numpy(), tsne_projection(protos, seed=0))
    assert np.allclose(state["method"]["similarity"].numpy(), cosine_similarity_from_prototypes(protos).numpy())
    loss = build_loss("swrm", {"window": 3, "projection": state["method"]["projection"].tolist(),
                               "similarity": state["method"]["similarity"].tolist()},
                      class_counts=state["class_counts"].tolist())
    assert torch.allclose(state["loss"]["swm_margin"], loss.swm_margin)


@pytest.mark.parametrize("over, match", [
    ({"loss": {"name": "ce"}}, "needs loss.name: swrm"),
    ({"method.params": {"start_epoch": 3}}, "start_epoch must be an integer in \\[0, train.epochs = 3\\)"),
    ({"method.params": {"start_epoch": 1, "similarity": "euclid"}}, "similarity must be one of"),
    ({"method.params": {"start_epoch": 1, "similarity_run": "/nonexistent"}}, "trained run folder"),
    ({"method.params": {"start_epoch": 1, "perplexity": 4}}, "perplexity must be a number in \\(0, 4\\)"),
    ({"loss": {"name": "swrm", "params": {"projection": [0, 1, 2, 3]}}}, "computes the similarity itself"),
    ({"method.params": {}, "train.lr_schedule": "cosine"}, "needs method.params.start_epoch"),
])
def test_method_configuration_errors(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        train_run(config_from_dict(_cfg("swrm", **over)), tmp_path / "r", arrays=tiny_arrays())
    assert not (tmp_path / "r").exists()


def test_dyswrm_configuration_and_default_start_epoch():
    from longtail.methods import build_method

    class Data:
        num_classes, class_counts = 4, [40, 25, 15, 10]

    cfg = config_from_dict(_cfg("dyswrm", **{"method.params": {}, "train.milestones": [2]}))
    assert build_method(cfg, Data()).start_epoch == 2  # the first LR milestone, as DRW
    with pytest.raises(ConfigError, match="init_std must be a number > 0"):
        build_method(config_from_dict(_cfg("dyswrm", **{"method.params": {"init_std": 0}})), Data())


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt"


@pytest.mark.parametrize("name", ["swrm", "dyswrm"])
def test_configs_use_the_benchmark_budget_and_the_drw_switch(name):
    from longtail import class_counts

    path = CONFIGS / f"{name}.yaml"
    cfg, base, drw = load_config(path), load_config(CONFIGS / "ce.yaml"), load_config(CONFIGS / "ce_drw.yaml")
    command = f"# longtail train configs/cifar10_lt/{name}.yaml --out runs/cifar10_lt_{name}"
    assert path.read_text().splitlines()[0] == command
    assert cfg.data == base.data and cfg.train == base.train and cfg.model == base.model and cfg.sampler == base.sampler
    assert cfg.method.name == name and cfg.method.params["start_epoch"] == drw.reweight.start_epoch == 24
    assert cfg.loss.name == "swrm" and cfg.reweight.scheme == "none"
    loss = build_loss(cfg.loss.name, cfg.loss.params, class_counts=class_counts("exp", 10, 5000, 100))
    assert torch.isfinite(loss(torch.randn(4, 10), torch.tensor([0, 3, 9, 9])))


def test_neutral_loss_is_exactly_cross_entropy_and_tracks_its_state():
    z, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 4
    counts = np.array([40, 20, 10, 5])
    loss = build_loss("swrm", {"window": 3}, class_counts=counts)
    assert loss.neutral and torch.equal(loss(z, y), F.cross_entropy(z, y))  # stage 1 of `swrm`: bitwise CE
    fresh = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.set_similarity(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert not loss.neutral and not torch.equal(loss(z, y), F.cross_entropy(z, y))
    trained = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.load_state_dict(fresh)
    assert loss.neutral
    loss.load_state_dict(trained)
    assert not loss.neutral
