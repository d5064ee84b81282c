"""DLSA: the Gaussian-mixture flow, the three objectives, routing, the cascade and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from longtail.cli import main
from longtail.dlsa import (DLSACascade, DLSAConfig, GaussianMixtureFlow, cluster_posterior, default_clusters, route,
                           run_dlsa)
from longtail.dlsa import cascade as cascade_module
from longtail.dlsa.cascade import Standardiser, cluster_prior_table, likelihood_threshold, train_flow
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


def test_standardiser_floors_nearly_dead_dimensions():
    rng = np.random.default_rng(0)
    n = 5000
    nearly_dead = np.zeros(n)
    nearly_dead[:2] = 0.05  # a post-ReLU channel active in 2 of 5000 samples
    x = np.c_[rng.normal(size=n), 3 * rng.normal(size=n) + 1, nearly_dead]
    unfloored = Standardiser(x, std_floor=0)(x)
    assert np.abs(unfloored[:, 2]).max() > 40  # ~sqrt(n / 2): the outliers that broke the flows
    std = Standardiser(x)
    out = std(x)
    assert std.keep.tolist() == [0, 1, 2]
    np.testing.assert_allclose(out[:, :2].std(0), 1, atol=1e-5)  # ordinary dimensions: unchanged
    np.testing.assert_allclose(out[:, :2], unfloored[:, :2])
    assert np.abs(out[:, 2]).max() < 1  # the floor keeps the nearly dead channel small
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-6)


def test_config_validation_and_default_clusters():
    assert [default_clusters(c) for c in (10, 100, 365, 1000)] == [50, 158, 302, 500]
    with pytest.raises(ConfigError, match="filter_share"):
        DLSAConfig(filter_share=1.5)
    with pytest.raises(ConfigError, match="clusters"):
        DLSAConfig(clusters=1)
    with pytest.raises(ConfigError, match="unknown dlsa option 'depht'.*depth"):
        DLSAConfig.from_dict({"depht": 2})
    with pytest.raises(ConfigError, match="flow_noise must be a number >= 0"):
        DLSAConfig(flow_noise=-0.1)
    with pytest.raises(ConfigError, match="flow_retries must be an integer >= 0"):
        DLSAConfig(flow_retries=1.5)
    with pytest.raises(ConfigError, match="std_floor"):
        DLSAConfig(std_floor=float("nan"))


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
    result = run_dlsa(fs, DLSAConfig(**_TINY))
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
    again = run_dlsa(_tiny_feature_set(), DLSAConfig(**_TINY))
    assert again["dlsa"]["last"]["top1"] == result["dlsa"]["last"]["top1"]
    assert again["filters"][1]["threshold"] == filters[1]["threshold"]


# ---- flow training safeguards (docs/dlsa.md, "Numerical safeguards") ------------------------

def _relu_features(*, n_max, ratio=10.0, classes=10, dim=64, seed=0, scale=1.0):
    """Synthetic post-ReLU, average-pooled backbone features: non-negative, ~40 % exact zeros
    (mean ~0.5 at scale 1), dead channels, nearly dead channels (dimensions constant within
    most classes), class-selective channels and a per-sample gain; exponential long-tailed
    counts n_max * ratio^(-c / (C - 1)). Returns (features (N, dim) float32, labels (N,))."""
    rng = np.random.default_rng(seed)
    counts = np.floor(n_max * ratio ** (-np.arange(classes) / (classes - 1))).astype(int)
    labels = np.repeat(np.arange(classes), counts)
    base = rng.normal(0.0, 0.6, size=(classes, dim))
    base[:, :dim // 8] = -3.0                          # dead channels
    base[rng.random((classes, dim)) < 0.15] += 1.5     # class-selective channels
    pre = base[labels] + rng.normal(0.0, 0.5, size=(len(labels), dim)) + 0.2
    features = np.maximum(pre, 0) * rng.gamma(2.0, 0.5, size=(len(labels), 1))
    return (features * scale).astype(np.float32), labels


def _standardised(features, cfg=DLSAConfig()):
    x = features.astype(np.float64)
    return torch.as_tensor(Standardiser(x, std_floor=cfg.std_floor)(x))


# name: (feature set, DLSAConfig overrides, blow-up check); the flows run with the defaults of
# `longtail dlsa` (3 filters, 50 epochs, batch 512, lr 0.2) unless a case says otherwise. Before
# the safeguards the three 2,040-sample sets broke like the reported CIFAR-10 run: scale 1e3
# stopped with "filter 3: the flow loss became non-finite at epoch 34", scale 1 and 1e-3
# finished with blown-up flows (mean training log-likelihood -2e6 and -4e13 nats).
_FEATURE_SETS = {
    "relu_10_classes": (dict(n_max=500, seed=1), {}, True),
    "relu_scale_1e-3": (dict(n_max=500, scale=1e-3), {}, True),
    "relu_scale_1e3": (dict(n_max=500, scale=1e3), {}, True),
    # fewer samples than dimensions and one step per epoch: finite, but the eval-mode
    # likelihoods lag the batch-norm running statistics (official semantics), so no bound
    "relu_tiny": (dict(n_max=20), {}, False),  # 78 samples, 2 in the rarest class; filter 3 trains on 37
    "relu_100_classes": (dict(n_max=30, classes=100), {"flow_epochs": 20}, True),
    "relu_512_dims": (dict(n_max=60, dim=512), {"flow_epochs": 20}, False),
}


@pytest.mark.parametrize("case", sorted(_FEATURE_SETS))
def test_default_flow_cascade_trains_without_restarts(case):
    set_args, overrides, bounded = _FEATURE_SETS[case]
    features, labels = _relu_features(**set_args)
    cfg = DLSAConfig(cls_epochs=1, eval_every=1, **overrides)
    x = _standardised(features, cfg)
    cascade = DLSACascade(cfg, int(labels.max()) + 1).fit(x, labels)
    assert len(cascade.info) == 3
    for info in cascade.info:
        flow = info["flow"]
        assert flow["restarts"] == [] and flow["final_lr"] == cfg.flow_lr
        assert len(flow["history"]) == cfg.flow_epochs
        assert all(math.isfinite(h["loss"]) and h["max_grad_norm"] < 1e4 for h in flow["history"])
        if bounded:  # no blow-up: healthy flows stay near -1.5 nats per dimension
            assert min(h["mean_loglik"] for h in flow["history"]) > -10 * x.shape[1]
        assert math.isfinite(info["threshold"])
    routes, _ = cascade.route(x)
    assert np.bincount(routes, minlength=4).sum() == len(labels)


def _flaky_nll(monkeypatch, bad_calls):
    """Make the weighted likelihood loss NaN on the given (1-based) calls, or on every call."""
    calls = {"n": 0}
    real = cascade_module.weighted_nll

    def flaky(loglik, target, weights):
        calls["n"] += 1
        value = real(loglik, target, weights)
        return value * float("nan") if bad_calls == "all" or calls["n"] in bad_calls else value

    monkeypatch.setattr(cascade_module, "weighted_nll", flaky)


def test_non_finite_epoch_goes_back_and_halves_the_rate(monkeypatch, caplog):
    features, labels = _relu_features(n_max=40)  # 159 samples: 4 steps of 32 per epoch
    x = _standardised(features)
    args = dict(clusters=8, num_classes=10, seed=0)
    reference, _ = train_flow(x, labels, cfg=DLSAConfig(flow_epochs=1, flow_batch=32, flow_select="last"), **args)
    after_epoch_1 = reference.state_dict()
    initial = GaussianMixtureFlow(x.shape[1], clusters=8, seed=0).state_dict()
    restored = []
    real_restore = cascade_module._restore
    monkeypatch.setattr(cascade_module, "_restore",
                        lambda flow, balance, saved: (restored.append(saved), real_restore(flow, balance, saved)))
    _flaky_nll(monkeypatch, {6, 7})  # epoch 2, step 2; then the repeated epoch 2 fails again at once
    caplog.clear()  # the reference flow's own lines (logged when an earlier test set the level to INFO)
    with caplog.at_level("INFO", logger="longtail"):
        _, info = train_flow(x, labels, cfg=DLSAConfig(flow_epochs=4, flow_batch=32), **args)
    logs = caplog.messages
    assert info["restarts"] == [
        {"epoch": 2, "failure": "the flow loss is not finite at step 2", "resumed_after_epoch": 1, "new_lr": 0.1},
        {"epoch": 2, "failure": "the flow loss is not finite at step 1", "resumed_after_epoch": 0, "new_lr": 0.05}]
    assert "epoch 2: the flow loss is not finite at step 2; went back to the state after epoch 1 and halved " \
           "the flow learning rate to 0.1" in logs[0]
    assert "went back to the initial weights and halved the flow learning rate to 0.05" in logs[1]
    assert [r.levelname for r in caplog.records[:2]] == ["WARNING", "WARNING"]
    for saved, expected in zip(restored, (after_epoch_1, initial), strict=True):
        assert saved["flow"].keys() == expected.keys()
        assert all(torch.equal(saved["flow"][k], expected[k]) for k in expected)
    assert saved["step"] == 0  # the balancedness estimator starts over too
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and {h["lr"] for h in history} == {0.05}
    assert info["final_lr"] == 0.05 and "2 restart(s), final lr 0.05" in logs[-1]


def test_flow_that_keeps_diverging_stops_with_advice(monkeypatch):
    features, labels = _relu_features(n_max=40)
    _flaky_nll(monkeypatch, "all")
    with pytest.raises(ConfigError) as err:
        train_flow(_standardised(features), labels, cfg=DLSAConfig(flow_epochs=3, flow_retries=2), clusters=8,
                   num_classes=10, seed=0, name="filter 2")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("filter 2: flow training diverged at epoch 1 (the flow loss is not finite at step 1) "
                              "after 2 restart(s), each with half the learning rate (last 0.05); ")
    assert "lower --flow-lr (now 0.2), raise --flow-noise (now 0.05;" in message
    assert message.endswith("raise --flow-retries (now 2)")


def test_dequantisation_noise_is_seeded_and_only_in_training():
    features, labels = _relu_features(n_max=40)
    x = _standardised(features)
    cfg = DLSAConfig(flow_epochs=2, flow_batch=32, flow_select="last")
    runs = [train_flow(x, labels, cfg=c, clusters=8, num_classes=10, seed=0)
            for c in (cfg, cfg, DLSAConfig(flow_epochs=2, flow_batch=32, flow_select="last", flow_noise=0))]
    lls = [flow.score(x)[0] for flow, _ in runs]
    assert torch.equal(lls[0], lls[1])  # same seed: the same noise, the same flow
    assert not torch.equal(lls[0], lls[2])  # the noise does change training
    assert torch.equal(runs[0][0].score(x)[0], lls[0])  # scoring is deterministic: no noise in eval


def test_dlsa_command_end_to_end(tmp_path, monkeypatch, capsys):
    import longtail.features
    import longtail.rundir

    fs = _tiny_feature_set()
    monkeypatch.setattr(longtail.features, "extract_features", lambda *a, **k: fs)

    class _Eval:
        many_threshold, few_threshold = 100, 20

    monkeypatch.setattr(longtail.rundir.RunDir, "read_config", lambda self: type("C", (), {"eval": _Eval})())
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
    assert "run folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _patch_run_inputs(monkeypatch):
    """`longtail dlsa` on the tiny feature set without a run folder (as in the end-to-end test)."""
    import longtail.features
    import longtail.rundir

    fs = _tiny_feature_set()
    monkeypatch.setattr(longtail.features, "extract_features", lambda *a, **k: fs)

    class _Eval:
        many_threshold, few_threshold = 100, 20

    monkeypatch.setattr(longtail.rundir.RunDir, "read_config", lambda self: type("C", (), {"eval": _Eval})())


_FLOW_ARGS = ["--clusters", "8", "--depth", "2", "--flow-epochs", "2", "--flow-batch", "64", "--cls-epochs", "1"]


def test_dlsa_command_reports_flow_restarts(tmp_path, monkeypatch, capsys):
    _patch_run_inputs(monkeypatch)
    _flaky_nll(monkeypatch, {1})
    assert main(["dlsa", str(tmp_path / "run"), "--out", str(tmp_path / "out"), *_FLOW_ARGS]) == 0
    captured = capsys.readouterr()
    assert "filter 1: epoch 1: the flow loss is not finite at step 1; went back to the initial weights" in captured.err
    assert "1 flow restart(s), lr 0.1" in captured.out
    result = json.loads((tmp_path / "out" / "dlsa.json").read_text())
    assert result["filters"][0]["flow"]["restarts"][0]["new_lr"] == 0.1 and result["config"]["flow_noise"] == 0.05
    assert [h["lr"] for h in result["flow_history"][0]] == [0.1, 0.1]
    assert result["filters"][1]["flow"]["restarts"] == []


def test_dlsa_command_flow_divergence_is_one_line(tmp_path, monkeypatch, capsys):
    _patch_run_inputs(monkeypatch)
    _flaky_nll(monkeypatch, "all")
    args = ["dlsa", str(tmp_path / "run"), "--out", str(tmp_path / "out"), *_FLOW_ARGS, "--flow-retries", "1"]
    assert main(args) == 2
    *warnings, err = capsys.readouterr().err.strip().splitlines()  # the error is one line, the last
    assert len(warnings) == 1 and "went back to the initial weights and halved the flow learning rate" in warnings[0]
    assert "filter 1: flow training diverged at epoch 1" in err
    assert "lower --flow-lr (now 0.2), raise --flow-noise (now 0.05" in err
    assert not (tmp_path / "out").exists()


def test_large_classifier_snapshots_go_to_disk_and_come_back_equal():
    """At thousands of classes the cluster-aided classifier's C x C prior layer makes every snapshot
    hundreds of MB: above `spill_bytes` a snapshot is written to a temporary file, read back
    equal, and its file goes with the object."""
    from longtail.dlsa.classifier import Snapshots

    snaps = Snapshots(spill_bytes=1000)
    small = {"w": torch.arange(10.0)}
    large = {"w": torch.randn(40, 40), "b": torch.randn(40)}
    snaps.append(5, small)
    snaps.append(10, large)
    small["w"].zero_()  # the snapshot is a copy
    assert snaps.epochs == [5, 10] and len(snaps) == 2
    assert torch.equal(snaps[0][1]["w"], torch.arange(10.0))
    folder = snaps._folder.name
    assert isinstance(snaps._items[1][1], Path) and snaps._items[1][1].is_file()
    epoch, back = snaps[1]
    assert epoch == 10 and all(torch.equal(back[k], large[k]) for k in large)
    assert [e for e, _ in snaps] == [5, 10]
    del snaps, back
    import gc

    gc.collect()
    assert not Path(folder).exists()


# ---- the classifiers' start from the run's own head (official PaCo configs) -----------------

def _linear_head_feature_set(seed=0) -> FeatureSet:
    """The tiny feature set with a constant feature dimension and logits = W f + b of a stored head."""
    fs = _tiny_feature_set(seed)
    rng = np.random.default_rng(seed + 1)
    w, b = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    for split in fs.splits.values():
        f = np.concatenate([split["features"], np.full((len(split["labels"]), 1), 2.5, np.float32)], 1)
        split["features"], split["logits"] = f, f @ w.T + b
    fs.head = {"weight": w, "bias": b}
    return fs


def test_standardised_head_gives_the_runs_logits_on_standardised_features():
    fs = _linear_head_feature_set()
    train = fs["train"]
    std = Standardiser(np.asarray(train["features"], dtype=np.float64))
    assert len(std.keep) == 6  # the constant dimension is dropped
    weight, bias = cascade_module.standardised_head(fs.head, std, train)
    for split in ("train", "test"):
        x = torch.as_tensor(std(np.asarray(fs[split]["features"], dtype=np.float64)))
        assert torch.allclose(x @ weight.T + bias, torch.as_tensor(fs[split]["logits"]), atol=1e-4)


def test_init_from_head_starts_every_classifier_at_the_runs_head():
    fs = _linear_head_feature_set()
    cfg = DLSAConfig(**{**_TINY, "cls_epochs": 1, "eval_every": 1, "cls_lr": 1e-12}, init_from_head=True)
    result = run_dlsa(fs, cfg)
    assert result["config"]["init_from_head"] is True
    # with no learning the classifier alone is the run's head: the same predictions
    assert result["classifier_alone"]["last"]["top1"] == result["run_head"]["top1"]
    assert result["classifier_alone"]["last"]["mcc"] == pytest.approx(result["run_head"]["mcc"])
    plain = run_dlsa(fs, DLSAConfig(**{**_TINY, "cls_epochs": 1, "eval_every": 1, "cls_lr": 1e-12}))
    assert plain["classifier_alone"]["last"]["top1"] != result["run_head"]["top1"]  # a random start differs


def test_init_from_head_refuses_a_head_that_is_not_linear(tmp_path, monkeypatch, capsys):
    fs = _tiny_feature_set()  # its logits are not W f + b of a stored head
    with pytest.raises(ConfigError, match="no .classes x features. weight"):
        run_dlsa(fs, DLSAConfig(**_TINY, init_from_head=True))
    fs.head = {"weight": np.ones((5, 6), np.float32)}
    with pytest.raises(ConfigError, match="plain linear head"):
        run_dlsa(fs, DLSAConfig(**_TINY, init_from_head=True))
    _patch_run_inputs(monkeypatch)  # the command: one line, no output folder
    assert main(["dlsa", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--init-from-head",
                 *_FLOW_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-from-head needs a run whose head is a linear layer" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="init_from_head must be true or false"):
        DLSAConfig(init_from_head="yes")
