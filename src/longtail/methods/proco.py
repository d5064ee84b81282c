"""ProCo: probabilistic contrastive learning (Du, Wang, Song, Huang, "Probabilistic Contrastive
Learning for Long-Tailed Visual Recognition", TPAMI 2024), read against the official code
LeapLabTHU/ProCo at commit af9e78ef6b3d731fed963781e5a4861658028fc2 (ProCo_cifar/main.py,
ProCo_cifar/loss/proco.py `ProCoLoss`, `EstimatorCV`, `LogRatioC`, `miller_recurrence`,
ProCo_cifar/loss/logitadjust.py, ProCo_cifar/models/resnet_cifar.py `Model`, sh/ProCo_CIFAR.sh).

ProCo is BCL's two-branch layout (methods/bcl.py: the three views, one joint backbone pass, an
MLP projection head) with BCL's batch contrastive loss replaced by its expectation under one von
Mises-Fisher (vMF) distribution per class, estimated online from the projections:

* statistics (`VMFEstimator`): per class c the running mean m_c (C, d) of the L2-normalised
  projections seen and their number n_c; R_c = |m_c|, mu_c = m_c / R_c and the concentration
  kappa_c = d R_c / (1 - R_c^2) (official `update_kappa`; capped at 1e5, also where R_c >= 1);
* the closed-form expected contrastive logits (`proco_logits`): for a projection z (d,) and
  temperature T, with nu = d/2 - 1 and log C_d(k) = nu log k - (d/2) log(2 pi) - log I_nu(k)
  the vMF log normaliser,
      logit_c(z) = log C_d(kappa_c) - log C_d(|kappa_c mu_c + z / T|)
  (E_{z' ~ vMF(mu_c, kappa_c)} exp(z . z' / T) = C_d(kappa_c) / C_d(|kappa_c mu_c + z / T|));
* the ProCo term: the logit-adjusted CE of those logits, CE(logit + prior_tau log pi, y)
  (official: the same `LogitAdjust` object as the classification loss, tau 1), averaged over the
  two contrastive views; loss = L_cls(regular view) + alpha * ProCo term.

log I_nu(k) for large nu and k overflows when evaluated directly (I_63(1e4) ~ e^9996):
`log_bessel_iv` works in logs throughout - the uniform (Debye) asymptotic expansion for orders
>= 30 (terms generated exactly from the DLMF 10.41.12 recurrence) and, below, the backward
three-term recurrence of the ratios I_k / I_{k+1} from order nu + m >= 30 down to nu (stable for I,
all terms positive). The official code instead runs Miller's backward recurrence from order
2 nu, normalised by i0e(k) (`bessel='official'`, the default, reproduced by `_miller_log_ive`):
exact for small k but off for k >> nu (for nu = 63: 5e-6 at k = 1e3, 0.53 at 1e4, 2.8 at 1e5
in log I), which is why its backward clips the gradient I_{nu+1} / I_nu at 1 (docs/methods.md,
"ProCo").
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist as distributed
from ..losses._checks import choice, integer, number
from ..losses.logit_adjustment import PRIOR_EPS
from ..models import Classifier
from ..models.contrastive import ProjectionHead
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing
from .bcl import check_two_views, forward_three_views

BESSEL = ("official", "exact")
KAPPA_MAX = 1e5  # official update_kappa: kappa > 1e5 (and kappa < 0, i.e. R > 1) -> 1e5
KAPPA_MIN = 1e-6  # ours: R = 0 would give log I_nu(0) = -inf; never reached by real features
DEBYE_MIN_ORDER = 30  # orders at or above: the uniform expansion alone
DEBYE_TERMS = 8  # u_0 .. u_7: relative error of log I below 1e-13 from order 30 (tests/test_proco.py)


def _debye_polynomials(count: int) -> list[list[tuple[int, float]]]:
    """u_0 .. u_{count-1} of the uniform asymptotic expansion of I_nu (DLMF 10.41.10), exactly from
    u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds, u_0 = 1
    (DLMF 10.41.12), as [(power, coefficient)] lists."""
    polys = [{0: Fraction(1)}]
    for _ in range(count - 1):
        u, nxt = polys[-1], {}
        for p, c in u.items():
            if p:  # t^2 (1 - t^2) / 2 * p c t^(p-1)
                nxt[p + 1] = nxt.get(p + 1, 0) + c * p / 2
                nxt[p + 3] = nxt.get(p + 3, 0) - c * p / 2
            nxt[p + 1] = nxt.get(p + 1, 0) + c / (8 * (p + 1))
            nxt[p + 3] = nxt.get(p + 3, 0) - c * 5 / (8 * (p + 3))
        polys.append({p: c for p, c in nxt.items() if c != 0})
    return [sorted((p, float(c)) for p, c in u.items()) for u in polys]


_DEBYE = _debye_polynomials(DEBYE_TERMS)


def _log_iv_debye(order: float, x: torch.Tensor) -> torch.Tensor:
    """log I_order(x) by the uniform expansion: with z = x / order, s = sqrt(1 + z^2), t = 1 / s,
    eta = s + log(z / (1 + s)): order eta - log(2 pi order) / 2 + log(t) / 2 + log sum_k u_k(t) / order^k."""
    z = x / order
    s = torch.sqrt(1 + z * z)
    t = 1 / s
    eta = s + torch.log(z) - torch.log1p(s)
    total = torch.zeros_like(x)
    for poly in reversed(_DEBYE):
        total = total / order + sum(c * t ** p for p, c in poly)
    return order * eta - 0.5 * math.log(2 * math.pi * order) + 0.5 * torch.log(t) + torch.log(total)


def _log_iv_pair(order: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log I_order(x), log I_{order+1}(x)), float64 x > 0. Below DEBYE_MIN_ORDER: the ratios
    rho_k = I_k / I_{k+1} by the backward recurrence rho_{k-1} = 2 k / x + 1 / rho_k from the
    expansion's rho at order + m (m the steps up to DEBYE_MIN_ORDER), then
    log I_order = log I_{order+m} + sum_{j<m} log rho_{order+j}."""
    steps = max(0, math.ceil(DEBYE_MIN_ORDER - order))
    if steps == 0:
        return _log_iv_debye(order, x), _log_iv_debye(order + 1, x)
    top = order + steps
    log_top = _log_iv_debye(top, x)
    rho = torch.exp(log_top - _log_iv_debye(top + 1, x))
    log_i = log_top
    for j in range(steps):
        rho = 2 * (top - j) / x + 1 / rho  # rho_{top-j-1}
        log_i = log_i + torch.log(rho)
    return log_i, log_i - torch.log(rho)  # the last rho is rho_order = I_order / I_{order+1}


class _LogBesselIv(torch.autograd.Function):
    """log I_order(x) with d/dx = I_{order+1}(x) / I_order(x) + order / x (DLMF 10.29.2)."""

    @staticmethod
    def forward(ctx, x, order):
        log_i, log_i1 = _log_iv_pair(order, x)
        ctx.save_for_backward(x, torch.exp(log_i1 - log_i))
        ctx.order = order
        return log_i

    @staticmethod
    def backward(ctx, grad):
        x, ratio = ctx.saved_tensors
        return grad * (ratio + ctx.order / x), None


def log_bessel_iv(order: float, x: torch.Tensor) -> torch.Tensor:
    """log I_order(x), the modified Bessel function of the first kind, for a real order >= 0 and
    x > 0 (any shape), in float64, without overflow or underflow (log I_63(1e4) = 9996.7 where
    I_63(1e4) overflows; log I_511.5(1e-3) = -4.5e3 where it underflows); differentiable in x."""
    order = number("order", order, low=0)
    x = torch.as_tensor(x).to(torch.float64)
    if not bool((x > 0).all()):
        raise ValueError("log_bessel_iv needs x > 0")
    return _LogBesselIv.apply(x, order)


def _miller_log_ive(order: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `miller_recurrence` (ProCo_cifar/loss/proco.py), re-written: (log ive(order, x),
    log ive(order + 1, x)) for an integer order >= 1 by Miller's backward recurrence
    I_{i-1} = 2 i / x I_i + I_{i+1} from I_{2 order} = 1, I_{2 order + 1} = 0 down to I_0, normalised
    by torch.special.i0e; when any element of the next value overflows, every element is divided by
    its current value (the logs of the divisors kept, per element, for the stored orders)."""
    a, b = torch.ones_like(x), torch.zeros_like(x)  # I_i, I_{i+1} (unnormalised)
    scale, scale_v, scale_v1 = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    at_v = at_v1 = None
    for i in range(2 * order, 0, -1):
        nxt = 2 * i / x * a + b
        if bool(torch.isinf(nxt).any()):
            log_a = torch.log(a)
            b, scale = b / a, scale + log_a
            if i >= order + 1:
                scale_v, scale_v1 = scale_v + log_a, scale_v1 + log_a
            elif i == order:
                scale_v = scale_v + log_a
            a = torch.ones_like(x)
            nxt = 2 * i / x * a + b
        a, b = nxt, a
        if i == order:
            at_v = b
        elif i == order + 1:
            at_v1 = b
    log_i0e = torch.log(torch.special.i0e(x))
    return (log_i0e + torch.log(at_v) - torch.log(a) + scale_v - scale,
            log_i0e + torch.log(at_v1) - torch.log(a) + scale_v1 - scale)


class _OfficialLogRatio(torch.autograd.Function):
    """The official `LogRatioC`: log ive(nu, k) + k - nu log(k + 1e-20) - logc by the Miller
    recurrence (nu = int(d/2 - 1) there, the float d/2 - 1 in the power), with the gradient
    ive(nu + 1, k) / ive(nu, k) clipped at 1."""

    @staticmethod
    def forward(ctx, kappa, dim, logc):
        log_ive, log_ive1 = _miller_log_ive(int(dim / 2 - 1), kappa)
        ctx.save_for_backward(torch.exp(log_ive1 - log_ive))
        return log_ive + kappa - (dim / 2 - 1) * torch.log(kappa + 1e-20) - logc

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio.clamp(max=1.0), None, None


def log_vmf_normalizer(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """log C_d(kappa) = nu log kappa - (d/2) log(2 pi) - log I_nu(kappa), nu = d/2 - 1: the log
    normaliser of the vMF density C_d(kappa) exp(kappa mu . z) on the unit sphere in R^d (d >= 2)."""
    nu = dim / 2 - 1
    kappa = torch.as_tensor(kappa).to(torch.float64)
    return nu * torch.log(kappa) - dim / 2 * math.log(2 * math.pi) - log_bessel_iv(nu, kappa)


def log_inverse_normalizer(dim: int, kappa: torch.Tensor, bessel: str) -> torch.Tensor:
    """-log C_d(kappa) up to the constant (d/2) log(2 pi): log I_nu(kappa) - nu log kappa, the
    official `logc` ('official': its Miller recurrence; 'exact': log_bessel_iv). No gradient."""
    kappa = kappa.to(torch.float64)
    if bessel == "official":
        log_ive, _ = _miller_log_ive(int(dim / 2 - 1), kappa)
        return log_ive + kappa - (dim / 2 - 1) * torch.log(kappa + 1e-20)
    return log_bessel_iv(dim / 2 - 1, kappa) - (dim / 2 - 1) * torch.log(kappa)


def proco_logits(features: torch.Tensor, directions: torch.Tensor, kappa: torch.Tensor, logc: torch.Tensor, *,
                 temperature: float, bessel: str = "exact") -> torch.Tensor:
    """(B, C) expected contrastive logits log C_d(kappa_c) - log C_d(|kappa_c mu_c + z_i / T|), float64.

    Args:
        features: (B, d) projections z (L2-normalised in ProCo; any rows work).
        directions: (C, d) unit mean directions mu_c; kappa: (C,) concentrations; logc: (C,)
            `log_inverse_normalizer(d, kappa, bessel)` (statistics: no gradient).
        bessel: 'exact' (log_bessel_iv) or 'official' (its Miller recurrence, gradient clipped at 1).

    |kappa mu + z / T|^2 = kappa^2 + 2 kappa mu . z / T + |z|^2 / T^2 (a (B, C) matmul instead of
    the official (B, C, d) tensor; floored at 1e-12 before the square root)."""
    d = features.shape[1]
    z = features.to(torch.float64)
    k = kappa.to(torch.float64)
    sq = k[None, :] ** 2 + 2 * k[None, :] * (z @ directions.to(torch.float64).T) / temperature \
        + (z * z).sum(1, keepdim=True) / temperature ** 2
    kappa_new = torch.sqrt(sq.clamp_min(1e-12))
    logc = logc.to(torch.float64)[None, :]
    if bessel == "official":
        return _OfficialLogRatio.apply(kappa_new, d, logc)
    return _LogBesselIv.apply(kappa_new, d / 2 - 1) - (d / 2 - 1) * torch.log(kappa_new) - logc


class VMFEstimator:
    """Per-class running vMF statistics of the projections (official `EstimatorCV`), float64.

    `mean` (C, d): the mean of every projection of class c seen since the last `reset` (a random
    direction of norm 0.9 before the first, official init); `amount` (C,): their number. `update`
    merges a batch's per-class sums and counts, summed over the processes under torchrun first
    (the official code all-gathers the features and labels: the same sums). `kappa` / `logc` are
    refreshed from `mean` by `refresh` (official `update_kappa`)."""

    def __init__(self, num_classes: int, dim: int, *, bessel: str):
        self.num_classes, self.dim, self.bessel = num_classes, dim, bessel
        self.mean = self.amount = self.kappa = self.logc = None

    def reset(self, generator: torch.Generator, device=None) -> None:
        """Official `reset`: directions N(0, I) normalised, times 0.9 (kappa = d 0.9 / 0.19); no counts."""
        mean = F.normalize(torch.randn(self.num_classes, self.dim, generator=generator, dtype=torch.float64), dim=1)
        self.mean = (0.9 * mean).to(device)
        self.amount = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self.refresh()

    def update(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Running per-class mean: m <- m (1 - w) + batch mean w, w = n_batch / (n_batch + n_seen)
        (w = 0 for a class absent from the batch); n_seen += n_batch."""
        onehot = F.one_hot(target, self.num_classes).to(torch.float64)
        sums = distributed.all_reduce_sum(onehot.T @ features.detach().to(torch.float64))
        counts = distributed.all_reduce_sum(onehot.sum(0))
        batch_mean = sums / counts.clamp_min(1)[:, None]
        total = counts + self.amount
        w = torch.where(total > 0, counts / total.clamp_min(1), torch.zeros_like(total))[:, None]
        self.mean = self.mean * (1 - w) + batch_mean * w
        self.amount = self.amount + counts

    def refresh(self) -> None:
        """kappa = d R / (1 - R^2), R = |mean|; above KAPPA_MAX or R >= 1: KAPPA_MAX (official); at
        least KAPPA_MIN (ours); logc = log I_nu(kappa) - nu log kappa."""
        r = torch.linalg.norm(self.mean, dim=1)
        kappa = self.dim * r / (1 - r ** 2)
        bad = (r >= 1) | ~torch.isfinite(kappa) | (kappa > KAPPA_MAX)
        self.kappa = torch.where(bad, torch.full_like(kappa, KAPPA_MAX), kappa).clamp_min(KAPPA_MIN)
        self.logc = log_inverse_normalizer(self.dim, self.kappa, self.bessel)

    def directions(self) -> torch.Tensor:
        return F.normalize(self.mean, dim=1)

    def to(self, device) -> None:
        for name in ("mean", "amount", "kappa", "logc"):
            setattr(self, name, getattr(self, name).to(device))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).detach().cpu().clone() for name in ("mean", "amount", "kappa", "logc")}

    def load_state_dict(self, state: dict) -> None:
        for name in ("mean", "amount", "kappa", "logc"):
            value = torch.as_tensor(state[name], dtype=torch.float64)
            want = (self.num_classes, self.dim) if name == "mean" else (self.num_classes,)
            if tuple(value.shape) != want:
                raise ValueError(f"ProCo estimator state '{name}' has shape {tuple(value.shape)}, expected {want}")
            setattr(self, name, value.clone())


@METHODS.register("proco")
class ProCo(Method):
    """ProCo (Du et al., TPAMI 2024): L_cls(regular view) + alpha * mean over the two contrastive
    views of CE(proco_logits + prior_tau log pi, y).

    Parameters (method.params):
        alpha: weight of the ProCo term (official --alpha, 1.0).
        temperature: T in |kappa mu + z / T| (official --temp, 0.1 on CIFAR).
        feat_dim: projection size d (official --feat_dim, 128); nu = d / 2 - 1.
        hidden_features: the projection MLP's hidden width (official dim_hidden, 512).
        views: the contrastive views' pipelines (official: two SimCLR views, `augmentation_sim_cifar`).
        prior_tau: tau of the ProCo term's logit adjustment (official: the classification
            criterion `LogitAdjust`, tau 1); 0: plain CE of the expected logits.
        bessel: 'official' (its Miller recurrence from order 2 nu, gradient clipped at 1; inaccurate
            for kappa >> nu) or 'exact' (log_bessel_iv; the paper's formula evaluated accurately).
        joint_forward: one backbone pass over the concatenated 3B images (official).

    State (checkpoints): the two estimators, as the official `criterion_scl` it pickles: `previous`
    (official `estimator_old`, the one the logits use) and `current` (`estimator`). At each epoch
    start `previous` takes `current` (the statistics of the last epoch) and `current` restarts;
    both take every projection of the epoch (`previous` thus covers the last epoch and this one so
    far). The random restarts draw from a generator seeded with (train.seed, epoch): resume is exact.
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'ProCo: the Bessel-ratio series branches on device values in a Python loop (methods/proco.py)',
    )

    def __init__(self, *, cfg, data, alpha: float = 1.0, temperature: float = 0.1, feat_dim: int = 128,
                 hidden_features: int = 512, views=("simclr", "simclr"), prior_tau: float = 1.0,
                 bessel: str = "official", joint_forward: bool = True):
        super().__init__(cfg=cfg, data=data)
        self.alpha = number("alpha", alpha, low=0)
        self.temperature = number("temperature", temperature, low=0, low_open=True)
        self.bessel = choice("bessel", bessel, BESSEL)
        self.feat_dim = integer("feat_dim", feat_dim, low=4 if self.bessel == "official" else 2)
        self.hidden_features = integer("hidden_features", hidden_features, low=1)
        self.views = check_two_views(views)
        self.prior_tau = number("prior_tau", prior_tau, low=0)
        if not isinstance(joint_forward, bool):
            raise ValueError(f"joint_forward must be true or false, got {joint_forward!r}")
        self.joint_forward = joint_forward
        refuse_batch_mixing(cfg, "proco")
        counts = np.asarray(data.class_counts, dtype=np.float64)
        self.log_prior = torch.as_tensor(np.log(np.power(counts / counts.sum(), self.prior_tau) + PRIOR_EPS))
        C = data.num_classes
        self.previous = VMFEstimator(C, self.feat_dim, bessel=self.bessel)
        self.current = VMFEstimator(C, self.feat_dim, bessel=self.bessel)

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not hasattr(model, "contrastive_head"):
            model.add_module("contrastive_head", ProjectionHead(model.num_features, self.feat_dim,
                                                                hidden_features=self.hidden_features))
        return model

    def _restart_generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.cfg.train.seed) * 1_000_003 + 7919 * (epoch + 1))

    def on_epoch_start(self, epoch: int, loss) -> None:
        """Official `_hook_before_epoch`: previous <- current, current restarts."""
        super().on_epoch_start(epoch, loss)
        gen = self._restart_generator(epoch)
        if self.current.mean is None:  # the official constructor's draw
            self.current.reset(self._restart_generator(-1))
        self.previous.mean, self.previous.amount = self.current.mean, self.current.amount
        self.previous.kappa, self.previous.logc = self.current.kappa, self.current.logc
        self.current.reset(gen, self.current.mean.device)

    def contrast_logits(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One official `ProCoLoss.forward` with labels: both estimators take the (detached)
        features, `previous` refreshes kappa, then the (B, C) expected logits against it."""
        for est in (self.previous, self.current):
            if est.mean.device != features.device:
                est.to(features.device)
        self.previous.update(features, target)
        self.current.update(features, target)
        self.previous.refresh()
        p = self.previous
        return proco_logits(features, p.directions(), p.kappa, p.logc, temperature=self.temperature,
                            bessel=self.bessel)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        """The two contrastive views come from `self.batches.views` (`forward_three_views`)."""
        if self.current.mean is None:  # a direct call without the loop's epoch start
            self.on_epoch_start(0, loss)
        B = images.shape[0]
        pooled, logits = forward_three_views(forward, images, self.batches, joint=self.joint_forward)
        projected = model.contrastive_head(pooled)  # all 3B rows through the head's BatchNorm (official)
        prior = self.log_prior.to(projected.device)
        terms = []
        for view in (projected[B:2 * B], projected[2 * B:]):
            z = self.contrast_logits(view, target)
            terms.append(F.cross_entropy(z + prior, target))
        ce = loss(logits, target)
        return StepResult(ce + self.alpha * ((terms[0] + terms[1]) / 2).to(ce.dtype), logits, target)

    def state_dict(self) -> dict:
        if self.current.mean is None:
            return {}
        return {"previous": self.previous.state_dict(), "current": self.current.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.previous.load_state_dict(state["previous"])
            self.current.load_state_dict(state["current"])
