"""`longtail analyze`: weight-norm statistics by hand, tau-normalisation as TauNormLinear,
t-SNE settings, the files it writes for a tiny run, the report's weight-norm figure, and
one-line errors for runs without a linear class head."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_arrays, tiny_config
from longtail.analysis import norm_statistics, tau_normalise, weight_norm_report
from longtail.analysis.analyze import analyze_runs
from longtail.analysis.embedding import seeded_subsample, tsne_of_features
from longtail.analysis.norms import linear_head_problem
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.models.heads import TauNormLinear
from longtail.report import build_report
from longtail.runs import train_run
from longtail.io import safe_torch_load


# rows of norm 5, 1 and 2; classes with 100, 10 and 50 training images
WEIGHT = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
COUNTS = np.array([100, 10, 50])


def test_norm_statistics_by_hand():
    s = norm_statistics(np.linalg.norm(WEIGHT, axis=1), COUNTS)
    mean = 8 / 3
    variance = ((5 - mean) ** 2 + (1 - mean) ** 2 + (2 - mean) ** 2) / 3  # = 78 / 27, population variance
    assert s["mean"] == pytest.approx(mean) and s["variance"] == pytest.approx(78 / 27)
    assert s["variance"] == pytest.approx(variance)
    assert s["std"] == pytest.approx(math.sqrt(78 / 27)) and s["cv"] == pytest.approx(math.sqrt(78 / 27) / mean)
    assert s["max_over_min"] == pytest.approx(5.0)
    assert s["spearman_vs_count"] == pytest.approx(1.0)  # norms rank as the counts do
    assert norm_statistics([2.0, 1.0, 3.0], [1, 2, 3])["spearman_vs_count"] == pytest.approx(0.5)
    flat = norm_statistics([1.0, 1.0], [5, 1])
    assert flat["variance"] == 0 and flat["spearman_vs_count"] is None and flat["max_over_min"] == 1
    with pytest.raises(ValueError, match="same length"):
        norm_statistics([1.0, 2.0], [1, 2, 3])


def test_tau_normalised_norms_are_norm_to_the_one_minus_tau():
    report = weight_norm_report(WEIGHT, COUNTS, taus=[0.0, 0.5, 1.0])
    assert report["l2"] == pytest.approx([5.0, 1.0, 2.0])
    by_tau = {t["tau"]: t for t in report["tau_normalised"]}
    assert by_tau[0.0]["l2"] == pytest.approx(report["l2"]) and by_tau[0.0]["variance"] == report["variance"]
    assert by_tau[0.5]["l2"] == pytest.approx([math.sqrt(5), 1.0, math.sqrt(2)])
    assert by_tau[1.0]["l2"] == pytest.approx([1.0, 1.0, 1.0]) and by_tau[1.0]["variance"] == pytest.approx(0)
    with pytest.raises(ValueError, match=r"weight must be \(C, D\) with C = 2"):
        weight_norm_report(WEIGHT, [1, 2])


def test_tau_normalise_is_the_effective_weight_of_tau_norm_linear():
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tau in (0.0, 0.7, 1.6):
        head = TauNormLinear(weight, tau=tau).double()
        effective = head(torch.eye(3, dtype=torch.float64)).t()  # unit features: the rows of W~ (tau is fp32)
        np.testing.assert_allclose(tau_normalise(weight.numpy(), tau), effective.detach().numpy(), rtol=1e-6)


def test_which_runs_have_a_linear_class_head():
    assert linear_head_problem({}) is None  # defaults: standard method, linear head
    assert linear_head_problem({"method": {"name": "tau_norm"}, "model": {"head": "linear"}}) is None
    assert "cosine" in linear_head_problem({"model": {"head": "cosine"}})
    assert "SSP pre-training run" in linear_head_problem({"method": {"name": "ssp"}})
    assert "nearest-class-mean" in linear_head_problem({"method": {"name": "ncm"}})
    assert "LWS" in linear_head_problem({"method": {"name": "lws"}})


def test_tsne_subsample_is_seeded_and_silhouettes_see_separated_classes():
    assert seeded_subsample(10, 20, seed=0).tolist() == list(range(10))
    a, b = seeded_subsample(100, 7, seed=1), seeded_subsample(100, 7, seed=1)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and not np.array_equal(a, seeded_subsample(100, 7, 2))
    rs = np.random.RandomState(0)
    labels = np.repeat([0, 1, 2], 20)
    features = rs.normal(size=(60, 5)) * 0.1 + np.eye(5)[labels] * 10  # three far-apart blobs
    t = tsne_of_features(features, labels, samples=31, seed=3)
    assert t["coords"].shape == (31, 2) and len(t["indices"]) == 31 and t["perplexity"] == pytest.approx(10.0)
    assert t["silhouette"] > 0.9 and set(t["silhouette_per_class"]) == {0, 1, 2}
    again = tsne_of_features(features, labels, samples=31, seed=3)
    np.testing.assert_array_equal(t["coords"], again["coords"])  # seeded: the same map
    mixed = tsne_of_features(rs.normal(size=(60, 5)), labels, samples=30, seed=3)
    assert mixed["silhouette"] < 0.1  # no class structure


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CE run with a validation split, a tau_norm run on it, a cosine-head run and an SSP run."""
    root = tmp_path_factory.mktemp("analysis_runs")
    arrays = tiny_arrays(test_per_class=8)
    cfg = tiny_config(**{"data.val_per_class": 2, "train.epochs": 1})
    train_run(config_from_dict(cfg), root / "ce", arrays=arrays)
    tau = tiny_config(**{"data.val_per_class": 2, "method.name": "tau_norm",
                         "method.params": {"stage1": str(root / "ce/checkpoints/last.pt")}})
    train_run(config_from_dict(tau), root / "tau_norm", arrays=arrays)
    cosine = tiny_config(**{"model.head": "cosine", "train.epochs": 1})
    train_run(config_from_dict(cosine), root / "cosine", arrays=arrays, evaluate=False)
    ssp = tiny_config(**{"method.name": "ssp", "train.epochs": 1})
    train_run(config_from_dict(ssp), root / "ssp", arrays=arrays, evaluate=False)
    return root, arrays


def test_analyze_writes_norms_tau_and_tsne_of_tiny_runs(runs, tmp_path, monkeypatch):
    root, arrays = runs
    import longtail.features as features

    real = features.extract_features
    monkeypatch.setattr("longtail.analysis.analyze.extract_features",
                        lambda *a, **k: real(*a, **{**k, "arrays": arrays}))  # in-memory data source
    out = tmp_path / "out"
    result = analyze_runs([root / "ce", root / "tau_norm"], out, taus=[0.5], tsne_samples=20, seed=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["analysis.json", "weight_norms.png", "weight_norms_tau_ce.png", "weight_norms_tau_tau_norm.png",
         "tsne_ce.png", "tsne_tau_norm.png"])
    assert json.loads((out / "analysis.json").read_text()) == json.loads(json.dumps(result))
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300
    ce, tau_run = result["runs"]
    weight = safe_torch_load(root / "ce/checkpoints/last.pt")["model"]["fc.weight"].double()
    assert ce["weight_norms"]["l2"] == pytest.approx(weight.norm(dim=1).tolist(), rel=1e-6)
    assert ce["weight_norms"]["variance"] == pytest.approx(float(weight.norm(dim=1).var(unbiased=False)), rel=1e-6)
    assert [t["tau"] for t in ce["weight_norms"]["tau_normalised"]] == [0.5, 1.0]
    posthoc = json.loads((root / "tau_norm/posthoc.json").read_text())
    assert tau_run["run_tau"] == posthoc["tau"]
    assert tau_run["weight_norms"]["tau_normalised"][0]["tau"] == posthoc["tau"]  # the run's own tau first
    assert tau_run["weight_norms"]["l2"] == pytest.approx(ce["weight_norms"]["l2"])  # tau_norm keeps stage 1's W
    assert ce["tsne"]["samples"] == 20 and len(ce["tsne"]["silhouette_per_class"]) == 4
    assert ce["head_to_tail"] == [0, 1, 2, 3] and ce["train_counts"][0] > ce["train_counts"][-1]
    assert result["table"][0]["variance"] == ce["weight_norms"]["variance"]
    assert not ce["seconds"]["features_from_cache"]
    again = analyze_runs([root / "ce"], tmp_path / "again", tsne=False)
    assert again["runs"][0]["seconds"]["features_from_cache"] and "tsne" not in again["runs"][0]
    # the report now finds the cached head: a seventh figure, the weight norms
    info = build_report([root / "ce"], tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert info["figures"] == 7 and 'data-figure="weight_norms"' in html
    assert f"variance {ce['weight_norms']['variance']:.4g}" in html


@pytest.mark.parametrize("name, message", [
    ("cosine", "its head is 'cosine' (model.head)"),
    ("ssp", "an SSP pre-training run: its head predicts 4 rotations"),
])
def test_runs_without_a_linear_class_head_give_one_line_errors(runs, name, message, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "out"
    assert main(["analyze", str(root / "ce"), str(root / name), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"longtail: error: cannot analyze {root / name}: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()  # checked before anything was extracted or written


def test_bad_inputs_give_one_line_errors(runs, tmp_path, capsys):
    root, _ = runs
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "nope")], "run folder not found"),
        ([str(tmp_path / "empty")], "not a run folder (no config.yaml)"),
        ([str(root / "ce"), "--out", str(tmp_path / "file")], "is a file; give a folder"),
        ([str(root / "ce"), "--tau", "-1"], "--tau must be a finite number >= 0"),
        ([str(root / "ce"), "--tsne-samples", "2"], "--tsne-samples must be >= 4"),
        ([str(root / "tau_norm"), "--checkpoint", "best_val"], "no best_val checkpoint"),
    ]
    for args, message in cases:
        argv = ["analyze", *args] + ([] if "--out" in args else ["--out", str(tmp_path / "o")])
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.startswith("longtail: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="give at least one run folder"):
        analyze_runs([], tmp_path / "o")
