"""DLSA: the Gaussian-mixture flow, the three objectives, routing, the cascade and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from longtail.cli import main
from longtail.dlsa import DLSAConfig, GaussianMixtureFlow, cluster_posterior, default_clusters, route, run_dlsa
from longtail.dlsa.cascade import Standardiser, cluster_prior_table, likelihood_threshold
from longtail.dlsa.classifier import ClusterAidedClassifier
from longtail.dlsa.flow import MADE, FlowBatchNorm, made_masks
from longtail.dlsa.losses import BalancednessLoss, PairSampler, likelihood_weights, purity_loss, weighted_nll
from longtail.errors import ConfigError
from longtail.features import FeatureSet


def _trained_stats_flow(dim=5, clusters=7, dtype=torch.float32, scale_clamp=5.0, seed=0):
    """A flow whose batch-norm running statistics are not the identity (a few train-mode passes)."""
    flow = GaussianMixtureFlow(dim, clusters=clusters, seed=seed, scale_clamp=scale_clamp).to(dtype)
    gen = torch.Generator().manual_seed(1)
    flow.train()
    with torch.no_grad():
        for _ in range(5):
            flow(torch.randn(64, dim, generator=gen, dtype=dtype) * 2 + 1)
    return flow.eval()


# ---- flow ------------------------------------------------------------------------------------

def test_made_masks_are_autoregressive_in_both_orders():
    for reverse in (False, True):
        made = MADE(5, hidden=5, reverse=reverse).double().eval()
        x = torch.randn(5, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0][0], x)  # du_i / dx_j
        order = made.order
        depends = order[None, :] > order[:, None]  # x_j generated after x_i: du_i/dx_j must be 0
        assert torch.all(jac[depends] == 0)
        _, log_scale = made.shift_and_log_scale(x[None])
        torch.testing.assert_close(torch.diagonal(jac), torch.exp(-log_scale[0]))
    masks = made_masks(torch.arange(3), hidden=4, n_hidden=1)
    assert [tuple(m.shape) for m in masks] == [(4, 3), (4, 4), (3, 4)]
    assert masks[-1][0].sum() == 0  # the first variable's shift and scale are biases only


@pytest.mark.parametrize("clamp", [5.0, None])
def test_flow_is_invertible(clamp):
    flow = _trained_stats_flow(dim=6, scale_clamp=clamp)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        z, _ = flow.flow(x)
        back = flow.flow.inverse(z)
    assert (back - x).abs().max() < 1e-4


def test_log_det_equals_autograd_jacobian():
    flow = _trained_stats_flow(dim=4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, log_det = flow.flow(x)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow.flow(v[None])[0][0], x[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(float(logabs) - float(log_det[i].detach())) < 1e-10


def test_flow_batch_norm_statistics_and_log_det():
    bn = FlowBatchNorm(2)
    with torch.no_grad():
        bn.log_gamma.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    y, log_det = bn(x)
    var = x.var(0)  # unbiased: [4, 4]
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)
    torch.testing.assert_close(log_det[0], bn.log_gamma.detach() - 0.5 * torch.log(var + 1e-5))
    torch.testing.assert_close(y[:, 0], math.exp(0.5) * (x[:, 0] - 3.0) / math.sqrt(4 + 1e-5))


def test_mixture_likelihood_and_posteriors():
    flow = _trained_stats_flow(dim=5, clusters=7, dtype=torch.float64)
    x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z, joint, ll = flow(x)
    _, log_det = flow.flow(x)
    direct = (-2.5 * math.log(2 * math.pi) - 0.5 * (z[:, None, :] - flow.means[None]).pow(2).sum(-1)
              + log_det[:, None])
    torch.testing.assert_close(joint, direct)
    torch.testing.assert_close(ll, torch.logsumexp(direct, 1) - math.log(7))
    post = cluster_posterior(joint)
    torch.testing.assert_close(post.sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.isfinite(ll).all() and torch.isfinite(log_det).all()


def test_means_are_fixed_seeded_buffers():
    a = GaussianMixtureFlow(64, clusters=500, seed=3)
    b = GaussianMixtureFlow(64, clusters=500, seed=3)
    assert "means" in dict(a.named_buffers()) and "means" not in dict(a.named_parameters())
    torch.testing.assert_close(a.means, b.means)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert abs(float(a.means.std()) - 0.05) < 0.002
    assert not torch.equal(a.means, GaussianMixtureFlow(64, clusters=500, seed=4).means)


def test_likelihood_stays_finite_for_far_away_features():
    flow = _trained_stats_flow(dim=5)
    _, joint, ll = flow(torch.full((2, 5), 1e3))
    assert torch.isfinite(ll).all() and torch.isfinite(joint).all()


# ---- objectives ------------------------------------------------------------------------------

def test_likelihood_weights_and_weighted_nll_by_hand():
    w = likelihood_weights([4, 2, 1, 0], q=2)
    np.testing.assert_allclose(w, np.array([1 / 16, 1 / 4, 1, 0]) / (1 / 16 + 1 / 4 + 1))
    np.testing.assert_allclose(likelihood_weights([5, 5], q=2), [0.5, 0.5])
    loss = weighted_nll(torch.tensor([-1.0, -3.0]), torch.tensor([0, 2]), torch.tensor(w, dtype=torch.float32))
    assert float(loss) == pytest.approx(-(w[0] * -1.0 + w[2] * -3.0) / 2, rel=1e-6)


def test_balancedness_is_smallest_for_uniform_cluster_use():
    k = 4
    uniform = torch.zeros(8, k)  # equal joint log-likelihoods: P(h|x) uniform
    skewed = torch.tensor([[3.0, 0, 0, 0]] * 8)
    one_hot = torch.tensor([[50.0, 0, 0, 0]] * 8)
    values = [float(BalancednessLoss(clusters=k)(lj)) for lj in (uniform, skewed, one_hot)]
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert 0 < values[1] < values[2] <= math.log(k) + 1e-5
    # balanced use by different samples (each sample sure of its own cluster) is also uniform
    spread = torch.eye(k).repeat(2, 1) * 50
    assert float(BalancednessLoss(clusters=k)(spread)) == pytest.approx(0.0, abs=1e-5)


def test_balancedness_momentum_and_bias_correction_by_hand():
    loss = BalancednessLoss(clusters=2, momentum=0.7, floor=0.0)
    p1 = torch.tensor([0.8, 0.2])
    p2 = torch.tensor([0.4, 0.6])
    first = loss.estimate(torch.log(p1)[None])
    torch.testing.assert_close(first, p1)  # 0.3 p1 / (1 - 0.7)
    lj2 = torch.log(p2)[None].requires_grad_(True)
    second = loss.estimate(lj2)
    expected = (0.7 * 0.3 * p1 + 0.3 * p2) / (1 - 0.7 ** 2)
    torch.testing.assert_close(second, expected)
    second.sum().backward()
    assert lj2.grad is not None  # only the current batch carries a gradient
    assert loss.step == 2


def test_purity_loss_by_hand_and_frozen_positive():
    pos = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-12]])).requires_grad_(True)
    neg = torch.log(torch.tensor([[0.25, 0.25, 0.5]])).requires_grad_(True)
    value = purity_loss(pos, neg)
    assert float(value.detach()) == pytest.approx(0.5 * math.log(0.25) * 2, rel=1e-5)
    value.backward()
    assert pos.grad is None and neg.grad is not None


def test_objectives_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: purity_loss(a.detach(), u), (b,))
    assert torch.autograd.gradcheck(lambda u: BalancednessLoss(clusters=4)(u), (a,))
    w = torch.tensor([0.2, 0.8], dtype=torch.float64)
    ll = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: weighted_nll(u, torch.tensor([0, 1, 1]), w), (ll,))


def test_pair_sampler_draws_different_classes_uniformly():
    labels = np.repeat(np.arange(4), [400, 100, 20, 5])
    sampler = PairSampler(labels)
    pos, neg = sampler.epoch(np.random.default_rng(0))
    assert len(pos) == len(labels)
    assert np.all(labels[pos] != labels[neg])
    freq = np.bincount(labels[pos], minlength=4) / len(pos)
    assert np.all(np.abs(freq - 0.25) < 0.05)
    again = sampler.epoch(np.random.default_rng(0))
    assert np.array_equal(again[0], pos) and np.array_equal(again[1], neg)
    with pytest.raises(ValueError, match="at least 2 classes"):
        PairSampler(np.zeros(5, dtype=np.int64))


# ---- filtering and routing -------------------------------------------------------------------

def test_threshold_filters_the_top_share():
    ll = np.random.default_rng(0).normal(size=1000)
    thr = likelihood_threshold(ll, 0.3)
    assert int((ll >= thr).sum()) == 1000 - int(1000 * 0.7)


def test_route_sends_every_sample_to_exactly_one_classifier():
    lls = [np.array([5.0, 1.0, 1.0, 0.0, 9.0]), np.array([0.0, 3.0, 1.0, 0.0, 9.0])]
    assert route(lls, [4.0, 2.0]).tolist() == [0, 1, 2, 2, 0]
    rng = np.random.default_rng(1)
    lls = [rng.normal(size=200) for _ in range(3)]
    routes = route(lls, [0.5, 0.0, -0.5])
    one_hot = np.stack([routes == d for d in range(4)])
    assert np.all(one_hot.sum(0) == 1)


def test_non_finite_likelihoods_are_refused():
    from longtail.dlsa.cascade import _check_finite
    from longtail.errors import DataError

    with pytest.raises(DataError, match="filter 2: 1 of 3 log-likelihoods"):
        _check_finite(np.array([0.0, np.nan, -1.0]), "filter 2", "test")


def test_cluster_prior_rows_are_class_histograms():
    table = cluster_prior_table(np.array([0, 0, 0, 2]), np.array([1, 1, 0, 2]), 3, 3)
    np.testing.assert_allclose(table, [[1 / 3, 2 / 3, 0], [0, 0, 0], [0, 0, 1]], rtol=1e-6)
    head = ClusterAidedClassifier(4, 3)
    assert head(torch.zeros(2, 4), torch.as_tensor(table[[0, 2]])).shape == (2, 3)


def test_standardiser_drops_constant_dimensions():
    x = np.c_[np.arange(6.0), np.full(6, 3.0), np.arange(6.0) ** 2]
    std = Standardiser(x)
    assert std.keep.tolist() == [0, 2]
    out = std(x)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-5)


def test_config_validation_and_default_clusters():
    assert [default_clusters(c) for c in (10, 100, 365, 1000)] == [50, 158, 302, 500]
    with pytest.raises(ConfigError, match="filter_share"):
        DLSAConfig(filter_share=1.5)
    with pytest.raises(ConfigError, match="clusters"):
        DLSAConfig(clusters=1)
    with pytest.raises(ConfigError, match="unknown dlsa option 'depht'.*depth"):
        DLSAConfig.from_dict({"depht": 2})


# ---- the cascade -----------------------------------------------------------------------------

def _tiny_feature_set(seed=0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    counts = np.array([120, 60, 30, 15, 8])
    centres = rng.normal(size=(5, 6)) * 3

    def split(per_class):
        labels = np.repeat(np.arange(5), per_class)
        feats = centres[labels] + rng.normal(size=(len(labels), 6))
        return {"features": feats.astype(np.float32), "logits": (feats @ centres.T).astype(np.float32),
                "labels": labels}

    return FeatureSet(splits={"train": split(counts), "val": split([4] * 5), "test": split([20] * 5)},
                      class_counts=counts, class_names=[f"c{i}" for i in range(5)])


_TINY = dict(clusters=8, depth=2, flow_epochs=2, flow_batch=64, cls_epochs=4, eval_every=2, flow_lr=0.05)


def test_cascade_runs_on_a_tiny_feature_set_and_is_deterministic():
    fs = _tiny_feature_set()
    result = run_dlsa(fs, DLSAConfig(**_TINY), log=lambda *a: None)
    assert result["config"]["clusters"] == 8 and result["head_tail"]["tail_threshold"] == 30
    assert result["head_tail"]["tail_classes"] == [2, 3, 4]
    for model in ("classifier_alone", "dlsa"):
        assert set(result[model]) == {"last", "best_val"}
        assert 0 <= result[model]["last"]["top1"] <= 100
    filters = result["filters"]
    assert len(filters) == 2
    assert filters[0]["train_remaining"] == 233 and filters[0]["train_filtered"] == 233 - int(233 * 0.7)
    assert filters[1]["train_remaining"] == 233 - filters[0]["train_filtered"]
    test_counts = [f["test"]["filtered"] for f in filters] + [result["regular_classifier"]["test"]]
    assert sum(test_counts) == 100  # every test sample classified once
    for f in filters:
        assert f["test"]["separation_accuracy"] is None or 0 <= f["test"]["separation_accuracy"] <= 100
        assert math.isfinite(f["threshold"])
    assert set(result["dlsa_by_depth"]) == {"1", "2"} and result["dlsa"] == result["dlsa_by_depth"]["2"]
    assert result["dlsa_val_selected"]["depth"] in (1, 2)
    assert result["regular_classifier"]["classifier_top1"] is not None
    again = run_dlsa(_tiny_feature_set(), DLSAConfig(**_TINY), log=lambda *a: None)
    assert again["dlsa"]["last"]["top1"] == result["dlsa"]["last"]["top1"]
    assert again["filters"][1]["threshold"] == filters[1]["threshold"]


def test_dlsa_command_end_to_end(tmp_path, monkeypatch, capsys):
    import longtail.features
    import longtail.runs

    fs = _tiny_feature_set()
    monkeypatch.setattr(longtail.features, "extract_features", lambda *a, **k: fs)

    class _Eval:
        many_threshold, few_threshold = 100, 20

    monkeypatch.setattr(longtail.runs, "load_run_config", lambda run_dir: type("C", (), {"eval": _Eval})())
    args = ["dlsa", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--clusters", "8", "--depth", "2",
            "--flow-epochs", "2", "--flow-batch", "64", "--cls-epochs", "3", "--eval-every", "3", "--flow-lr", "0.05"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "filter 2:" in out and "separation accuracy" in out
    result = json.loads((tmp_path / "out" / "dlsa.json").read_text())
    assert result["config"]["depth"] == 2 and result["checkpoint"] == "last"
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("model,epoch_choice,epoch,top1")
    assert len(rows) == 1 + 1 + 2 + 2 * 2 + 1  # header, run head, alone, 2 depths x 2 choices, val-selected


def test_dlsa_command_bad_input_is_one_line(tmp_path, capsys):
    assert main(["dlsa", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--filter-share", "2"]) == 2
    assert "filter_share must be a number in (0, 1)" in capsys.readouterr().err
    assert main(["dlsa", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
