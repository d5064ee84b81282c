"""SADE (methods/sade.py): the diverse-expert loss by hand and at its neutral settings, float64 gradcheck,
the test-time aggregation (stability loss by hand, weights moving toward the stable expert, the stop
rule), a tiny run that resumes exactly, the test-agnostic evaluation's aggregated entries, bad params."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.sade import (DiverseExpertLoss, aggregate, distribution_seed, inverse_prior,
                                   learn_aggregation, stability_loss)

EXPERTS = {"model.name": "resnet20", "model.head": "cosine",
           "model.params": {"experts": {"num": 3, "shared_stages": 1, "widths": "ride", "scale": 30}}}


def _sade(**over):
    return {"method.name": "sade", **EXPERTS, **over}


def test_inverse_prior_mirrors_by_rank():
    prior = torch.tensor([0.1, 0.5, 0.15, 0.25])  # ranks (ascending): 0, 3, 1, 2
    assert inverse_prior(prior).tolist() == pytest.approx([0.5, 0.1, 0.25, 0.15])
    assert inverse_prior(torch.tensor([0.2, 0.3, 0.2, 0.3])).tolist() == pytest.approx([0.3, 0.2, 0.3, 0.2])
    sorted_desc = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert inverse_prior(sorted_desc).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def _ce(z, y):  # numpy cross-entropy by hand
    z = np.asarray(z, dtype=np.float64)
    return float(np.mean([np.log(np.exp(row).sum()) - row[t] for row, t in zip(z, y)]))


def test_each_expert_term_by_hand():
    counts = [60, 30, 10]
    pi = np.array(counts) / 100.0
    inv = np.array([0.1, 0.3, 0.6])
    z = np.array([[[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]],
                  [[0.3, -0.4, 2.0], [0.0, 1.0, 0.0]],
                  [[-1.0, 1.5, 0.5], [2.0, 0.0, -2.0]]])
    y = [0, 2]
    loss = DiverseExpertLoss(class_counts=counts, tau=2.0)
    terms = loss.terms(torch.tensor(z), torch.tensor(y))
    expected = [_ce(z[0], y), _ce(z[1] + np.log(pi + 1e-9), y),
                _ce(z[2] + np.log(pi + 1e-9) - 2.0 * np.log(inv + 1e-9), y)]
    assert terms.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(loss(torch.tensor(z), torch.tensor(y))) == pytest.approx(sum(expected), rel=1e-12)


def test_neutral_settings():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    skewed = DiverseExpertLoss(class_counts=[50, 20, 10, 5, 2], tau=2.0)
    terms = skewed.terms(z, y)
    assert torch.equal(terms[0], F.cross_entropy(z[0], y))  # expert 1: plain softmax CE, exactly
    bs = F.cross_entropy(z[1] + torch.log(torch.tensor([50, 20, 10, 5, 2.]) / 87 + 1e-9), y)
    torch.testing.assert_close(terms[1], bs)  # expert 2: balanced softmax
    tau0 = DiverseExpertLoss(class_counts=[50, 20, 10, 5, 2], tau=0.0).terms(z, y)
    torch.testing.assert_close(tau0[2], F.cross_entropy(z[2] + torch.log(torch.tensor([50, 20, 10, 5, 2.]) / 87 + 1e-9), y))
    equal = DiverseExpertLoss(class_counts=[7] * 5, tau=2.0).terms(z, y)  # balanced data: every shift is constant
    torch.testing.assert_close(equal, torch.stack([F.cross_entropy(z[e], y) for e in range(3)]))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 3, 4, 1])
    loss = DiverseExpertLoss(class_counts=[40, 20, 10, 5, 0], tau=2.0)  # an empty class: log(0 + 1e-9)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        DiverseExpertLoss(class_counts=[3, 2], tau=-1)
    with pytest.raises(ValueError, match="class_counts"):
        DiverseExpertLoss(class_counts=[0, 0])
    with pytest.raises(ValueError, match=r"\(3, B, C\)"):
        DiverseExpertLoss(class_counts=[3, 2])(torch.zeros(2, 4, 2), torch.zeros(4, dtype=torch.long))


def test_training_step_sums_the_three_terms_on_the_expert_logits():
    cfg, data, recipe = tiny_recipe(**_sade())
    model, method = recipe.model, recipe.method
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 0])
    result = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
    z = model.expert_outputs(images)[0]
    torch.testing.assert_close(result.loss, method.diverse(z, target))
    torch.testing.assert_close(result.logits, model(images))  # accuracy on the expert mean
    result.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_stability_loss_by_hand():
    a = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # (E=2, B=1, C=2)
    b = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]]])
    raw = torch.tensor([0.0, math.log(3.0)])  # softmax -> (1/4, 3/4)
    pa = torch.softmax(torch.tensor([0.5, 1.5]), 0)
    pb = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    expected = -float(pa @ pb / (pa.norm() * pb.norm()))
    assert float(stability_loss(raw, a, b)) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(aggregate(a, torch.tensor([0.25, 0.75])), torch.tensor([[0.5, 1.5]]))


def _views(stable: int, noise: float = 3.0):
    """view_logits of 3 experts over 64 'images': expert `stable` gives the same logits for both views,
    the others add fresh noise per view."""
    base = torch.randn(3, 64, 5, generator=torch.Generator().manual_seed(3))

    def view_logits(pos, generator):
        pos = torch.as_tensor(pos)
        out = []
        for _ in range(2):
            z = base[:, pos].clone()
            for e in range(3):
                if e != stable:
                    z[e] += noise * torch.randn(z[e].shape, generator=generator)
            out.append(z)
        return out[0], out[1]

    return view_logits


@pytest.mark.parametrize("stable", [0, 2])
def test_aggregation_moves_toward_the_stable_expert(stable):
    learned = learn_aggregation(_views(stable), 64, 3, epochs=3, lr=0.1, batch_size=16, stop_below=0.0,
                                generator=torch.Generator().manual_seed(0))
    w = learned["weights"]
    assert learned["epochs"] == 3 and not learned["stopped"] and sum(w) == pytest.approx(1.0)
    assert int(np.argmax(w)) == stable and w[stable] > 1 / 3 + 0.05
    again = learn_aggregation(_views(stable), 64, 3, epochs=3, lr=0.1, batch_size=16, stop_below=0.0,
                              generator=torch.Generator().manual_seed(0))
    assert again["weights"] == w  # seeded


def test_stop_rule_after_the_epoch_a_rounded_weight_falls_below():
    run = dict(lr=5.0, batch_size=16, generator=torch.Generator().manual_seed(0))
    learned = learn_aggregation(_views(0, noise=6.0), 64, 3, epochs=5, stop_below=0.05, **run)
    assert learned["stopped"] and learned["epochs"] < 5
    assert min(np.round(learned["weights"], 2)) < 0.05 and len(learned["stability"]) == learned["epochs"]
    never = learn_aggregation(_views(0, noise=6.0), 64, 3, epochs=5, stop_below=0.0,
                              lr=5.0, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert not never["stopped"] and never["epochs"] == 5
    assert distribution_seed(0, "uniform") == distribution_seed(0, "uniform") != distribution_seed(0, "forward2")


def test_tiny_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**_sade(**{"method.params": {"tau": 2.0}}))
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["train_loss"]) for x in lines if "train_loss" in x)


def test_test_agnostic_eval_reports_plain_and_aggregated(tmp_path, capsys):
    from longtail.cli import main
    from longtail.config import config_from_dict
    from longtail.runs import evaluate_test_agnostic, train_run

    cfg = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 12, "val_per_class": 2},
           "model": {"name": "resnet20", "head": "cosine",
                     "params": {"experts": {"num": 3, "widths": "ride", "scale": 30}}},
           "method": {"name": "sade", "params": {"aggregation_epochs": 2, "aggregation_batch_size": 32}},
           "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "progress": False,
                     "augment": {"crop_padding": 1, "flip": True}}}
    run = tmp_path / "run"
    train_run(config_from_dict(cfg), run)
    names = ["forward5", "uniform", "backward5"]
    result = evaluate_test_agnostic(run, names)
    assert result["test_time_aggregation"]["method"] == "sade"
    ev = json.loads((run / "eval.json").read_text())
    for name in names:
        entry = result["distributions"][name]
        agg = entry["aggregated"]
        assert set(agg) == {"weights", "epochs", "stopped", "stability", "top1", "many", "medium", "few",
                            "mean_per_class"}
        assert len(agg["weights"]) == 3 and sum(agg["weights"]) == pytest.approx(1.0)
        assert 1 <= agg["epochs"] <= 2 and entry["top1"] is not None and "prior_known" in entry
    assert result["distributions"]["uniform"]["top1"] == pytest.approx(ev["top1"])  # plain = the expert mean
    on_disk = json.loads((run / "eval_test_agnostic.json").read_text(), parse_constant=pytest.fail)
    assert on_disk["distributions"]["uniform"]["aggregated"]["weights"] == \
        result["distributions"]["uniform"]["aggregated"]["weights"]
    # one epoch: best_val.pt holds the last weights, so its aggregation is the last one's, not learnt twice
    from longtail.rundir import RunDir
    from longtail.runs import _same_weights

    assert result["best_val"]["epoch"] == result["epoch"] == 1 and _same_weights(RunDir(run))
    for name in names:
        assert result["best_val"]["distributions"][name]["aggregated"] == result["distributions"][name]["aggregated"]
    best = run / "checkpoints" / "best_val.pt"
    state = torch.load(best, weights_only=False)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key] + 1
    torch.save(state, run / "other.pt")
    best.rename(run / "kept.pt")
    (run / "other.pt").rename(best)
    assert not _same_weights(RunDir(run))
    (run / "kept.pt").replace(best)
    again = evaluate_test_agnostic(run, ["uniform"])  # seeded per distribution: the same weights alone
    assert again["distributions"]["uniform"]["aggregated"] == result["distributions"]["uniform"]["aggregated"]
    plain = evaluate_test_agnostic(run, names, aggregate=False)
    assert "test_time_aggregation" not in plain and all("aggregated" not in m for m in plain["distributions"].values())
    assert plain["distributions"]["uniform"]["top1"] == result["distributions"]["uniform"]["top1"]
    capsys.readouterr()
    assert main(["eval", str(run), "--test-agnostic", "uniform"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.strip().startswith("uniform")][0]
    assert "aggregated  weights" in out and row.count(" / ") == 2
    assert main(["eval", str(run), "--no-aggregation"]) == 2
    assert "--no-aggregation goes with --test-agnostic" in capsys.readouterr().err


@pytest.mark.parametrize("over, message", [
    ({"method.params": {"tau": -1}}, "tau must be a finite number >= 0"),
    ({"method.params": {"aggregation_epochs": 0}}, "aggregation_epochs must be an integer >= 1"),
    ({"method.params": {"aggregation_lr": 0}}, "aggregation_lr must be a finite number > 0"),
    ({"method.params": {"aggregation_stop": 1}}, "aggregation_stop must be a finite number >= 0 and < 1"),
    ({"method.params": {"aggregation_batch_size": 0}}, "aggregation_batch_size must be an integer >= 1"),
    ({"method.params": {"aggregation_momentum": 1.0}}, "aggregation_momentum must be a finite number >= 0 and < 1"),
    ({"method.params": {"experts": 3}}, "method .sade. has no parameter .experts."),
    ({"method.params": {"test_views": "simclr"}}, "test_views must be 'crop_jitter' or 'train'"),
    ({"model.params": {}}, "needs a network with exactly 3 experts"),
    ({"model.params": {"experts": {"num": 2}}}, "needs a network with exactly 3 experts .* has 2$"),
    ({"model.params": {"experts": 3}}, "experts must be a mapping"),  # the network's own check
    ({"loss.name": "focal"}, "replaces the configured loss"),
    ({"reweight.scheme": "inverse_frequency"}, "reweight.scheme: none"),
    ({"train.mixup_alpha": 0.2}, "without mixup"),
    ({"model.name": "small_cnn", "model.params": {"experts": {"num": 3}, "width": 4}}, "experts"),
])
def test_bad_params_are_one_line_config_errors(over, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_recipe(**_sade(**over))
    assert "\n" not in str(err.value)


def test_calibrated_prior_of_the_expert_mean():
    from longtail.methods.sade import SADE

    counts = [8, 4, 2, 1]  # exponential: pi * pi_inv is constant, so (pi * pi_inv^2)^(1/3) ~ pi_inv^(1/3)
    q = SADE.calibrated_prior(counts, {"tau": 2.0})
    inv = np.array([1, 2, 4, 8.0]) ** (1 / 3)
    assert q == pytest.approx(inv / inv.sum(), rel=1e-6) and q.sum() == pytest.approx(1.0)
    pi = np.array(counts) / 15
    assert SADE.calibrated_prior(counts, {"tau": 0.0}) == pytest.approx(pi ** (1 / 3) / (pi ** (1 / 3)).sum(), rel=1e-6)
    from longtail.inference import rebalanced_training
    from longtail.config import config_from_dict

    assert "method sade" in rebalanced_training(config_from_dict(tiny_config(**_sade())))
