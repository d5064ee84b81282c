"""ProCo (methods/proco.py): log I_v against scipy's ive (orders 0 .. 511.5, x 1e-3 .. 1e5, the
overflow and underflow regimes), the official Miller recurrence where it is exact and where it is
not, the closed-form expected contrastive logits against a Monte-Carlo estimate in 3-d, the vMF
normaliser in 3-d by hand, float64 gradcheck, the running estimator, the step's loss recomputed,
a tiny 2-epoch run that resumes exactly, and bad parameters as one-line ConfigErrors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import iv, ive

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.proco import (VMFEstimator, _miller_log_ive, log_bessel_iv, log_inverse_normalizer,
                                    log_vmf_normalizer, proco_logits)

ORDERS = [0.0, 0.5, 1.0, 5.5, 29.5, 30.0, 63.0, 63.5, 127.0, 511.5]
XS = np.concatenate([np.logspace(-3, 4, 15), [606.3, 1e5]])


@pytest.mark.parametrize("order", ORDERS)
def test_log_bessel_iv_matches_scipy_ive(order):
    ref = np.log(ive(order, XS)) + XS  # log I = log ive + x; -inf where ive underflows
    ok = np.isfinite(ref)
    got = log_bessel_iv(order, torch.tensor(XS)).numpy()
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got[ok] - ref[ok]) / np.maximum(1.0, np.abs(ref[ok]))) < 1e-12


def test_regimes_where_direct_evaluation_fails():
    """iv(63.5, 1e4) overflows, ive(511.5, 1e-3) underflows; the log is finite and right."""
    with np.errstate(over="ignore"):
        assert not np.isfinite(iv(63.5, 1e4))
    assert float(log_bessel_iv(63.5, torch.tensor(1e4, dtype=torch.float64))) == pytest.approx(np.log(ive(63.5, 1e4)) + 1e4, rel=1e-14)
    for order, x in [(511.5, 1e-3), (511.5, 1.0), (127.0, 1e-3)]:
        assert ive(order, x) == 0.0
        # small-x series: log I_v(x) = v log(x/2) - lgamma(v+1) + log sum_k (x^2/4)^k / (k! (v+1)_k)
        series, term = 1.0, 1.0
        for k in range(1, 8):
            term *= (x * x / 4) / (k * (order + k))
            series += term
        want = order * math.log(x / 2) - math.lgamma(order + 1) + math.log(series)
        assert float(log_bessel_iv(order, torch.tensor(x, dtype=torch.float64))) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("order", [0.5, 63.0, 511.5])
def test_derivative_is_the_bessel_ratio(order):
    x = torch.tensor([1e-2, 1.0, 50.0, 700.0, 1e4], dtype=torch.float64, requires_grad=True)
    log_bessel_iv(order, x).sum().backward()
    xs = x.detach().numpy()
    with np.errstate(under="ignore"):
        ratio = np.exp(np.log(ive(order + 1, xs)) - np.log(ive(order, xs)))
    ok = np.isfinite(ratio)
    want = ratio + order / xs
    assert np.allclose(x.grad.numpy()[ok], want[ok], rtol=1e-10)


@pytest.mark.parametrize("order", [0.0, 2.5, 63.0])
def test_gradcheck_log_bessel_iv(order):
    x = torch.tensor([0.05, 1.3, 40.0, 900.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: log_bessel_iv(order, t), (x,))


def test_official_miller_exact_for_moderate_kappa_off_for_large():
    """The official recurrence starts at order 2 nu: exact while kappa is not >> nu, off beyond
    (the quirk its gradient clip at 1 hides: the ratio it returns exceeds 1 at kappa = 1e4)."""
    x = torch.tensor([1e-3, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    log_v, log_v1 = _miller_log_ive(63, x)
    assert np.allclose(log_v.numpy(), np.log(ive(63, x.numpy())), rtol=1e-10, atol=1e-10)
    assert np.allclose(log_v1.numpy(), np.log(ive(64, x.numpy())), rtol=1e-10, atol=1e-10)
    at_init = torch.tensor([128 * 90 / 19], dtype=torch.float64)  # the initial kappa of d = 128
    assert float(_miller_log_ive(63, at_init)[0]) == pytest.approx(np.log(ive(63, 128 * 90 / 19)), rel=1e-7)
    far = torch.tensor([1e4], dtype=torch.float64)
    log_v, log_v1 = _miller_log_ive(63, far)
    assert abs(float(log_v) - np.log(ive(63, 1e4))) > 0.1
    assert float(torch.exp(log_v1 - log_v)) > 1.0


def test_vmf_normalizer_3d_by_hand():
    """d = 3: C_3(k) = k / (4 pi sinh k)."""
    for k in [1e-3, 0.7, 12.0, 300.0]:
        want = math.log(k) - math.log(4 * math.pi) - (k + math.log1p(-math.exp(-2 * k)) - math.log(2))
        assert float(log_vmf_normalizer(3, torch.tensor(k, dtype=torch.float64))) == pytest.approx(want, rel=1e-12, abs=1e-12)


def _vmf3_samples(mu, kappa, n, gen):
    """n samples of vMF(mu, kappa) on the 2-sphere: w = 1 + log(u + (1 - u) e^{-2 k}) / k (exact
    inverse CDF in 3-d), a uniform direction orthogonal to mu."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    w = 1 + torch.log(u + (1 - u) * math.exp(-2 * kappa)) / kappa
    phi = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    a = F.normalize(torch.cross(mu, torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), dim=0), dim=0)
    b = torch.cross(mu, a, dim=0)
    s = torch.sqrt((1 - w * w).clamp_min(0))
    return w[:, None] * mu + s[:, None] * (torch.cos(phi)[:, None] * a + torch.sin(phi)[:, None] * b)


def test_closed_form_matches_monte_carlo_3d():
    """exp(logit_c) = E_{z' ~ vMF(mu_c, kappa_c)} exp(z . z' / T), and the ProCo loss
    -log(pi_y E_y / sum_c pi_c E_c), against 400k samples per class in 3-d."""
    gen = torch.Generator().manual_seed(0)
    mus = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.4]], dtype=torch.float64), dim=1)
    kappas = torch.tensor([4.0, 1.5], dtype=torch.float64)
    z = F.normalize(torch.tensor([[0.5, 0.5, -0.2], [0.0, -1.0, 0.3]], dtype=torch.float64), dim=1)
    T = 0.5
    logits = proco_logits(z, mus, kappas, log_inverse_normalizer(3, kappas, "exact"), temperature=T)
    mc = torch.stack([torch.exp(z @ _vmf3_samples(mus[c], float(kappas[c]), 400_000, gen).T / T).mean(1)
                      for c in range(2)], dim=1)
    assert torch.allclose(torch.exp(logits), mc, rtol=5e-3)
    prior = torch.tensor([0.8, 0.2], dtype=torch.float64)
    y = torch.tensor([0, 1])
    loss = F.cross_entropy(logits + prior.log(), y)
    mc_loss = -(torch.log(prior[y] * mc[torch.arange(2), y]) - torch.log((prior * mc).sum(1))).mean()
    assert float(loss) == pytest.approx(float(mc_loss), abs=5e-3)


def test_official_logits_equal_exact_where_the_recurrence_is_exact():
    """d = 128 (nu = 63, the official recurrence from order 126), kappa and |kappa mu + z / T| <= 160:
    both readings give the same logits; at d = 4 (from order 2) the official recurrence is far off."""
    gen = torch.Generator().manual_seed(4)
    z = F.normalize(torch.randn(3, 128, generator=gen, dtype=torch.float64), dim=1)
    mus = F.normalize(torch.randn(5, 128, generator=gen, dtype=torch.float64), dim=1)
    kappas = torch.tensor([0.5, 3.0, 20.0, 90.0, 150.0], dtype=torch.float64)
    got = proco_logits(z, mus, kappas, log_inverse_normalizer(128, kappas, "official"), temperature=0.1,
                       bessel="official")
    want = proco_logits(z, mus, kappas, log_inverse_normalizer(128, kappas, "exact"), temperature=0.1)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    small = torch.tensor([4.0], dtype=torch.float64)
    assert abs(float(log_inverse_normalizer(4, small, "official") - log_inverse_normalizer(4, small, "exact"))) > 0.01


@pytest.mark.parametrize("bessel", ["exact", "official"])
def test_gradcheck_proco_logits(bessel):
    """d = 6 ('exact'); d = 128 for 'official' (its recurrence from order 2 nu is exact there)."""
    d = 6 if bessel == "exact" else 128
    gen = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(2, d, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
    mus = F.normalize(torch.randn(4, d, generator=gen, dtype=torch.float64), dim=1)
    kappas = torch.tensor([0.5, 3.0, 20.0, 150.0], dtype=torch.float64)
    logc = log_inverse_normalizer(d, kappas, bessel)
    assert torch.autograd.gradcheck(lambda t: proco_logits(t, mus, kappas, logc, temperature=0.3, bessel=bessel), (z,))


def test_estimator_running_mean_and_kappa():
    est = VMFEstimator(3, 4, bessel="exact")
    est.reset(torch.Generator().manual_seed(0))
    init_class2 = est.mean[2].clone()
    assert torch.allclose(est.mean.norm(dim=1), torch.full((3,), 0.9, dtype=torch.float64))
    assert torch.allclose(est.kappa, torch.full((3,), 4 * 90 / 19, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    f1, f2 = (F.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    y1, y2 = torch.tensor([0, 0, 1, 0, 1]), torch.tensor([1, 0, 0, 0, 0])
    est.update(f1, y1)
    est.update(f2, y2)
    est.refresh()
    f, y = torch.cat([f1, f2]), torch.cat([y1, y2])
    for c in (0, 1):
        assert torch.allclose(est.mean[c], f[y == c].mean(0), atol=1e-14)
        r = float(f[y == c].mean(0).norm())
        assert float(est.kappa[c]) == pytest.approx(4 * r / (1 - r * r), rel=1e-12)
    assert torch.equal(est.mean[2], init_class2)  # never seen: the initial direction stays
    assert est.amount.tolist() == [7.0, 3.0, 0.0]
    est.update(f1[:1].repeat(2, 1), torch.tensor([2, 2]))  # R = 1: kappa capped at 1e5 (official)
    est.refresh()
    assert float(est.kappa[2]) == 1e5
    assert torch.isfinite(est.logc).all()


def test_step_loss_is_ce_plus_alpha_proco():
    over = {"method.name": "proco", "loss.name": "logit_adjustment",
            "method.params": {"feat_dim": 6, "hidden_features": 8, "alpha": 0.7, "bessel": "exact"}}
    cfg, data, recipe = tiny_recipe(**over)
    model, method = recipe.model, recipe.method
    assert method.views == ("simclr", "simclr")
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 0])
    model.eval()  # no batch statistics moving
    method.on_epoch_start(0, recipe.loss)
    start = VMFEstimator(4, 6, bessel="exact")
    start.load_state_dict(method.previous.state_dict())
    with torch.no_grad():
        step = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator()).loss
        pooled, logits = split_forward(model)(torch.cat([x, x, x]))
        proj = model.contrastive_head(pooled)
        prior = torch.log(torch.as_tensor(np.asarray(data.class_counts, dtype=np.float64) / sum(data.class_counts)))
        terms = []
        for view in (proj[6:12], proj[12:]):
            start.update(view, y)
            start.refresh()
            z = proco_logits(view, start.directions(), start.kappa, start.logc, temperature=0.1)
            terms.append(F.cross_entropy(z + prior, y))
        want = recipe.loss(logits[:6], y) + 0.7 * (terms[0] + terms[1]) / 2
    assert torch.allclose(step, want.float(), atol=1e-5)


def test_alpha_zero_is_the_classification_loss():
    cfg, data, recipe = tiny_recipe(**{"method.name": "proco", "method.params": {"feat_dim": 4, "alpha": 0.0}})
    model, method = recipe.model, recipe.method
    model.eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        step = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator()).loss
        assert torch.equal(step, recipe.loss(split_forward(model)(x)[1], y))


def test_epoch_start_moves_current_to_previous():
    cfg, data, recipe = tiny_recipe(**{"method.name": "proco", "method.params": {"feat_dim": 4}})
    method = recipe.method
    method.on_epoch_start(0, recipe.loss)
    method.current.update(F.normalize(torch.ones(2, 4, dtype=torch.float64), dim=1), torch.tensor([1, 1]))
    seen = method.current.mean.clone()
    method.on_epoch_start(1, recipe.loss)
    assert torch.equal(method.previous.mean, seen) and method.previous.amount.tolist() == [0, 2, 0, 0]
    assert method.current.amount.sum() == 0


@pytest.mark.parametrize("bessel", ["official", "exact"])
def test_two_epochs_resume_exactly(tmp_path, monkeypatch, bessel):
    cfg = tiny_config(**{"method.name": "proco", "loss.name": "logit_adjustment", "train.deterministic": True,
                         "method.params": {"feat_dim": 8, "hidden_features": 16, "bessel": bessel}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(), evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert any(k.startswith("contrastive_head.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for which in ("previous", "current"):
        assert a["method"][which]["amount"].sum() > 0
        assert all(torch.equal(a["method"][which][k], b["method"][which][k]) for k in a["method"][which])


@pytest.mark.parametrize("params,msg", [
    ({"alpha": -1}, "alpha"), ({"temperature": 0}, "temperature"), ({"feat_dim": 3}, "feat_dim"),
    ({"feat_dim": 1, "bessel": "exact"}, "feat_dim"), ({"bessel": "scipy"}, "bessel"),
    ({"hidden_features": 0}, "hidden_features"), ({"views": ["simclr"]}, "views"),
    ({"views": ["simclr", "mocov9"]}, "mocov9"), ({"prior_tau": -1}, "prior_tau"),
    ({"joint_forward": "yes"}, "joint_forward"), ({"kappa": 3}, "kappa"),
])
def test_bad_params(params, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        tiny_recipe(**{"method.name": "proco", "method.params": params})
    assert "\n" not in str(err.value)


def test_no_batch_mixing():
    with pytest.raises(ConfigError, match="cutmix_alpha"):
        tiny_recipe(**{"method.name": "proco", "train.cutmix_alpha": 1.0})


def test_bad_inputs():
    with pytest.raises(ValueError, match="x > 0"):
        log_bessel_iv(1.0, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="order"):
        log_bessel_iv(-1.0, torch.tensor([1.0]))
    est = VMFEstimator(3, 4, bessel="exact")
    with pytest.raises(ValueError, match="mean"):
        est.load_state_dict({"mean": torch.zeros(2, 4), "amount": torch.zeros(3), "kappa": torch.ones(3),
                             "logc": torch.zeros(3)})
