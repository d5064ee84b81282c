"""The unified-perspective studies: Gaussian theorem checks, toy counts, mixup replacement, CLI."""

import json
import math

import numpy as np
import pytest

from longtail.cli import main
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.studies import gaussian as G
from longtail.studies import mixup_similarity as M
from longtail.studies import toy as T
from longtail.studies._points import Budget

TINY = Budget(data="digits", epochs=1, width=4)

# ----------------------------------------------------------------------------- Theorem 1


def test_theorem1_formulas_by_hand():
    kw = dict(mu1=0.0, mu2=2.0)
    assert G.theorem1_delta_derived(beta=0.5, p=0.5, **kw) == pytest.approx(0.25)  # 0.5 * 0.5 * 0.5 * 2
    assert G.theorem1_delta_printed(beta=0.5, p=0.5, **kw) == pytest.approx(0.75)  # 0.5 * 0.75 * 2
    assert G.theorem1_delta_derived(beta=0.3, p=1.0, **kw) == 0.0  # no similar samples: unbiased
    assert G.theorem1_delta_printed(beta=0.3, p=1.0, **kw) == pytest.approx(0.7)  # ...but printed says 0.7
    # bound: 1 - 2 exp(-a^2/s^2 * n+n-/(n++n-)) - 2 exp(-4 n+ a^2 / ((1-b)^2 (mu1-mu2)^2))
    b = G.theorem1_probability_bound(alpha=0.2, sigma=1.0, n_pos=100, n_neg=100, beta=0.5, **kw)
    assert b == pytest.approx(1 - 2 * math.exp(-0.04 * 50) - 2 * math.exp(-16.0))


@pytest.mark.parametrize("beta,p", [(0.2, 0.0), (0.5, 0.5), (0.8, 1.0), (0.5, 0.9)])
def test_theorem1_monte_carlo_matches_derived_delta_not_printed(beta, p):
    row = G.theorem1_row(mu1=0.0, mu2=2.0, sigma=1.0, beta=beta, p=p, n_pos=200, n_neg=50, alpha=0.25,
                         trials=3000, seed=11)
    assert abs(row.z_derived) < 4.0, row
    assert row.mc_std == pytest.approx(row.exact_std, rel=0.06)  # 3000 draws: std of the std ~1.3 %
    # The printed Delta is many standard errors away wherever it differs from the derived one.
    assert abs(row.z_printed) > 50
    # The theorem's probability statement holds for the derived Delta.
    assert row.coverage_derived >= row.bound - 0.01


def test_theorem1_simulation_is_seeded_and_checks_inputs():
    kw = dict(mu1=0.0, mu2=1.0, sigma=1.0, beta=0.5, p=0.5, n_pos=20, n_neg=10, trials=50)
    a, b = G.simulate_theorem1(seed=3, **kw), G.simulate_theorem1(seed=3, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, G.simulate_theorem1(seed=4, **kw))
    with pytest.raises(ConfigError, match="beta"):
        G.simulate_theorem1(seed=0, **{**kw, "beta": 1.0})
    with pytest.raises(ConfigError, match="mu1 < mu2"):
        G.simulate_theorem1(seed=0, **{**kw, "mu1": 2.0})
    with pytest.raises(ConfigError, match="n_pos"):
        G.simulate_theorem1(seed=0, **{**kw, "n_pos": 0})


# ----------------------------------------------------------------------------- Theorem 2

GENERAL = dict(mu1=[0.0, 0.0], mu2=[2.0, 1.0], cov=[[1.0, 0.3], [0.3, 0.5]])


def test_theorem2_closed_form_is_the_bayes_boundary_on_the_mean_line():
    point = G.theorem2_boundary(p_pos=0.9, **GENERAL)
    assert G.bayes_posterior_positive(point, p_pos=0.9, **GENERAL)[0] == pytest.approx(0.5, abs=1e-12)
    mid, d = np.array([1.0, 0.5]), np.array([2.0, 1.0])
    offset = point - mid
    assert abs(offset[0] * d[1] - offset[1] * d[0]) < 1e-12  # on the line through the means
    assert offset @ d > 0  # moved towards mu2: the majority (positive) region grows
    # Property 1: equal priors -> the midpoint.
    np.testing.assert_allclose(G.theorem2_boundary(p_pos=0.5, **GENERAL), mid, atol=1e-15)
    # Property 2: isotropic covariance sigma^2 I -> sigma^2 / |mu1-mu2|^2 (mu1-mu2) ln(p+/p-).
    mu1, mu2, s2 = np.zeros(3), np.array([1.0, 1.0, 0.0]), 0.64
    expected = 0.5 * (mu1 + mu2) - s2 / 2.0 * (mu1 - mu2) * math.log(0.8 / 0.2)
    np.testing.assert_allclose(G.theorem2_boundary(mu1=mu1, mu2=mu2, cov=s2, p_pos=0.8), expected, atol=1e-12)


@pytest.mark.parametrize("p_pos", [0.7, 0.9])
def test_theorem2_monte_carlo_agrees_with_eq3(p_pos):
    row = G.theorem2_row(case="general", p_pos=p_pos, n=2000, repeats=12, seed=5, **GENERAL)
    assert abs(row.z_logistic) < 4.0 and abs(row.z_plugin) < 4.0, row
    assert row.closed_form > 0.3  # the shift is large against its error: the check can fail


def test_theorem2_checks_inputs():
    with pytest.raises(ConfigError, match="positive definite"):
        G.theorem2_boundary(mu1=[0, 0], mu2=[1, 1], cov=[[1, 2], [2, 1]], p_pos=0.6)
    with pytest.raises(ConfigError, match="p_pos"):
        G.theorem2_boundary(p_pos=1.0, **GENERAL)
    with pytest.raises(ConfigError, match="estimator"):
        G.simulate_theorem2(p_pos=0.6, n=10, repeats=1, seed=0, estimator="svm", **GENERAL)


def test_gaussian_command_prints_formula_and_simulation(tmp_path, capsys):
    rc = main(["study", "gaussian", "--trials", "40", "--repeats", "3", "--n", "400", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "printed Delta = (1-b)(1-p/2)(mu2-mu1)" in text and "derived Delta = (1-b)(1-p)(mu2-mu1)/2" in text
    result = json.loads((tmp_path / "gaussian.json").read_text())
    assert len(result["theorem1"]) == 18 and len(result["theorem2"]) == 7
    assert (tmp_path / "gaussian.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["study", "gaussian", "--trials", "1"]) == 2


# ----------------------------------------------------------------------------- toy


def test_toy_grid_and_counts():
    assert T.count_grid(100, 5000, 1225) == [100, 1325, 2550, 3775, 5000]
    paper = T.count_grid(100, 5000, 100)
    assert len(paper) == 50 and paper[0] == 100 and paper[-1] == 5000
    assert T.count_grid(10, 45, 20) == [10, 30, 45]
    assert T.toy_counts(1, 700, min_count=100, max_count=5000) == [700] * 9 + [100]
    assert T.toy_counts(2, 700, min_count=100, max_count=5000) == [5000] * 9 + [700]
    pts = T.toy_points((1, 2), [100, 2550, 5000], min_count=100, max_count=5000)
    assert [(p["case"], p["varied"]) for p in pts] == [(1, 100), (1, 2550), (1, 5000), (2, 5000), (2, 2550), (2, 100)]
    with pytest.raises(ConfigError, match="--step"):
        T.count_grid(10, 20, 0)
    with pytest.raises(ConfigError, match="--cases"):
        T.toy_points((3,), [1], min_count=1, max_count=1)


def test_toy_point_builds_exactly_its_counts_and_nested_subsets():
    counts_small, counts_large = T.toy_counts(1, 10, min_count=7, max_count=60), T.toy_counts(1, 60, min_count=7,
                                                                                             max_count=60)
    small = build_data(config_from_dict(T.point_config(counts_small, TINY, seed=0)).data)
    large = build_data(config_from_dict(T.point_config(counts_large, TINY, seed=0)).data)
    assert small.class_counts.tolist() == counts_small and large.class_counts.tolist() == counts_large
    assert len(small.train) == 9 * 10 + 7 and len(small.test) == 500
    assert set(small.train.index) <= set(large.train.index)  # class by class, the first n of one order
    with pytest.raises(ConfigError, match="data.counts"):
        config_from_dict({"data": {"source": "digits", "profile": "counts"}})
    with pytest.raises(ConfigError, match="data.counts"):
        config_from_dict({"data": {"source": "digits", "profile": "exp", "counts": [1] * 10}})
    with pytest.raises(ConfigError, match="10 classes"):
        build_data(config_from_dict({"data": {"source": "digits", "profile": "counts", "counts": [5] * 9}}).data)


def test_toy_study_end_to_end_resumes_and_skips(tmp_path, monkeypatch):
    out = tmp_path / "toy"
    kw = dict(budget=TINY, min_count=5, max_count=15, step=10)
    result = T.run_toy(out, **kw)
    # case 1: 5, 15 (minority 5); case 2: 15, 5 (majority 15): three distinct trainings
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["m00005_n00005_s0", "m00015_n00005_s0",
                                                               "m00015_n00015_s0"]
    for p in result["points"]:
        expected = T.toy_counts(p["case"], p["varied"], min_count=5, max_count=15)
        assert p["train_counts"] == expected
        saved = json.loads((out / p["run"] / "data.json").read_text())
        assert saved["class_counts"] == expected
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4
    assert (out / "toy.png").read_bytes()[:4] == b"\x89PNG"

    # A point cut off after training but before evaluation is evaluated, never retrained;
    # finished points are read back.
    (out / "runs/m00015_n00005_s0/eval.json").unlink()
    import longtail.runs

    def no_training(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(longtail.runs, "fit", no_training)
    again = T.run_toy(out, **kw)
    assert [p["top1"] for p in again["points"]] == pytest.approx([p["top1"] for p in result["points"]])
    with pytest.raises(ConfigError, match="another config"):
        T.run_toy(out, **{**kw, "budget": Budget(data="digits", epochs=2, width=4)})


# ----------------------------------------------------------------------------- mixup similarity


@pytest.mark.parametrize("rho,n,k", [(0.0, 10, 0), (0.25, 10, 3), (0.2, 128, 26), (0.5, 5000, 2500), (1.0, 7, 7)])
def test_mixup_replaces_exactly_round_rho_n(rho, n, k):
    rs = np.random.RandomState(0)
    labels = np.array([0] * n + [1] * 5 + [2] * 4)
    images = rs.randint(0, 256, size=(len(labels), 4, 4, 3)).astype(np.uint8)
    new, replaced, partners = M.mixup_replace(images, labels, major=0, minor=2, rho=rho, lam=0.3, seed=1)
    assert M.replaced_count(rho, n) == k and len(replaced) == k and len(set(replaced.tolist())) == k
    assert (labels[replaced] == 0).all() and (labels[partners] == 2).all()
    changed = np.flatnonzero((new != images).any(axis=(1, 2, 3)))
    assert set(changed.tolist()) <= set(replaced.tolist())
    untouched = np.setdiff1d(np.arange(len(labels)), replaced)
    np.testing.assert_array_equal(new[untouched], images[untouched])
    expected = np.rint(0.3 * images[replaced].astype(np.float32) + 0.7 * images[partners].astype(np.float32))
    np.testing.assert_array_equal(new[replaced], expected.astype(np.uint8))
    assert new.dtype == np.uint8 and new.shape == images.shape


def test_mixup_replacement_is_nested_and_checked():
    labels = np.array([0] * 20 + [1] * 3)
    images = np.random.RandomState(1).randint(0, 256, size=(23, 2, 2, 1)).astype(np.uint8)
    _, r1, p1 = M.mixup_replace(images, labels, major=0, minor=1, rho=0.2, lam=0.5, seed=4)
    _, r2, p2 = M.mixup_replace(images, labels, major=0, minor=1, rho=0.6, lam=0.5, seed=4)
    np.testing.assert_array_equal(r2[:len(r1)], r1)
    np.testing.assert_array_equal(p2[:len(p1)], p1)
    with pytest.raises(ConfigError, match="rho"):
        M.mixup_replace(images, labels, major=0, minor=1, rho=1.5, lam=0.5, seed=0)
    with pytest.raises(ConfigError, match="differ"):
        M.mixup_replace(images, labels, major=1, minor=1, rho=0.5, lam=0.5, seed=0)
    pts = M.sweep_points([0, 0.1, 0.2], [0.2, 0.6, 1.0], rho_fixed=0.2, lam_fixed=0.2)
    assert [(p["rho"], p["lam"], p["sweeps"]) for p in pts] == [
        (0.0, 1.0, ["rho", "lam"]), (0.1, 0.2, ["rho"]), (0.2, 0.2, ["rho", "lam"]), (0.2, 0.6, ["lam"])]


def test_mixup_study_trains_on_replaced_images_with_kept_labels(tmp_path, monkeypatch):
    seen = {}
    original = M.run_point

    def spy(cfg, run_dir, *, arrays=None):
        seen[run_dir.name] = arrays
        return original(cfg, run_dir, arrays=arrays)

    monkeypatch.setattr(M, "run_point", spy)
    result = M.run_mixup_similarity(tmp_path / "mix", budget=TINY, imbalance_ratio=10.0, max_count=40,
                                    rhos=[0.0, 0.5], lams=[0.2], rho_fixed=0.5, lam_fixed=0.2)
    base = build_data(config_from_dict(M.base_config(TINY, imbalance_ratio=10.0, max_count=40, seed=0)).data)
    assert result["train_counts"] == base.class_counts.tolist() and base.class_counts[0] == 40
    base_images = base.train.batch(np.arange(len(base.train)))
    by_run = {p["run"].split("/")[1]: p for p in result["points"]}
    assert sorted(by_run) == ["baseline_s0", "rho0.500_lam0.200_s0"]
    for name, arrays in seen.items():
        np.testing.assert_array_equal(arrays["train_labels"], base.train.labels)  # labels kept
        changed = np.flatnonzero((arrays["train_images"] != base_images).any(axis=(1, 2, 3)))
        assert (base.train.labels[changed] == 0).all()  # only majority images change
        assert by_run[name]["replaced"] == (20 if name.startswith("rho") else 0)
        saved = json.loads((tmp_path / "mix/runs" / name / "data.json").read_text())
        assert saved["class_counts"] == base.class_counts.tolist()
    assert (tmp_path / "mix/mixup_similarity.png").read_bytes()[:4] == b"\x89PNG"


def test_study_cli_errors_are_one_line(capsys):
    assert main(["study", "toy", "--data", "digits", "--root", "x", "--quick", "--out", "unused"]) == 2
    assert "--root is only used with --data cifar10" in capsys.readouterr().err
    assert main(["study", "mixup-similarity", "--data", "digits", "--rhos", "a,b", "--out", "unused"]) == 2
    assert "--rhos must be a comma-separated list" in capsys.readouterr().err
