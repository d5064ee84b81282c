"""Theorems 1 and 2 of the unified-perspective paper as Monte Carlo checks (pure numpy).

"Towards Understanding the Long-Tailed Problem: A Unified Perspective" (sample number and
category similarity), Section 4.1 (Theorem 1) and Section 5.1 (Theorem 2, Properties 1-2).

Theorem 1 (1-D, similar samples in the positive class). P(X|Y=+1) = N(mu1, sigma^2),
P(X|Y=-1) = N(mu2, sigma^2), mu1 < mu2. Each of the n+ positive training samples is, with
probability p, a plain draw Z+ ~ N(mu1, sigma^2) ("dissimilar"), and otherwise (probability
1 - p, "similar to the negative class") beta+ Z+ + (1 - beta+) Z- with independent
Z- ~ N(mu2, sigma^2). The n- negative samples are plain N(mu2, sigma^2). The estimated
classifier is f~B = (mean of positives + mean of negatives) / 2, and the theorem bounds
|f~B - (mu1 + mu2)/2 - Delta| <= alpha with probability at least

    1 - 2 exp(-alpha^2/sigma^2 * n+ n- / (n+ + n-)) - 2 exp(-4 n+ alpha^2 / ((1-beta+)^2 (mu1-mu2)^2)).

The paper prints Delta = (1 - beta+)(1 - p/2)(mu2 - mu1). Its own setup implies

    E[f~B] - (mu1 + mu2)/2 = (1/2) (1 - p)(1 - beta+)(mu2 - mu1)          (derived Delta)

since E[positive sample] = mu1 + (1 - p)(1 - beta+)(mu2 - mu1) and E[negative] = mu2. The
two disagree everywhere except where both vanish (beta+ = 1 or mu1 = mu2); e.g. at p = 1
(no similar samples) the printed value is (1 - beta+)(mu2 - mu1) / 2 > 0 while the classifier
is unbiased. (If the Bernoulli indicator were read the other way, similar with probability
p, the mean shift would be p (1 - beta+)(mu2 - mu1) / 2: not the printed value either.) The
checks here test the derived value; the printed one is shown beside it and is not used to
judge the simulation. Exact variance of the shift, for the Monte Carlo error:
Var f~B = (Var X+ / n+ + sigma^2 / n-) / 4 with
Var X+ = sigma^2 (p + (1-p)(beta^2 + (1-beta)^2)) + p (1-p) (1-beta)^2 (mu2 - mu1)^2.

Theorem 2 (d-dim, equal covariance, unequal priors p+ > p-). P(X|Y=+1) = N(mu1, Sigma),
P(X|Y=-1) = N(mu2, Sigma). The Bayes boundary is the hyperplane
w.(x - (mu1+mu2)/2) + ln(p+/p-) = 0, w = Sigma^-1 (mu1 - mu2); Eq. (3),

    B = (mu1 + mu2)/2 - (mu1 - mu2) ln(p+/p-) / ((mu1 - mu2)^T Sigma^-1 (mu1 - mu2)),

is the point where that hyperplane crosses the line through the two means, which is correct.
Reading chosen: the paper writes the class conditionals as N(mu, Sigma^2) but uses Sigma^-1
in Eq. (3) and Sigma = sigma^2 I in Property 2, so Sigma is read as the covariance matrix.
The boundary moves towards mu2 (the minority) by ||mu1 - mu2|| ln(p+/p-) / M along the mean
line, M the squared Mahalanobis distance. Monte Carlo estimates that crossing point from
samples in two ways: logistic regression (a discriminative fit that does not use the Gaussian
formula; well specified here because the log-odds are linear) and the plug-in Gaussian
estimate (sample means, pooled covariance, class frequencies in Eq. (3)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- checks


def _positive(name: str, value) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return v


def _unit(name: str, value, *, open_low: bool = False, open_high: bool = False) -> float:
    v = float(value)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v < 1 if open_high else v <= 1
    if not (math.isfinite(v) and low_ok and high_ok):
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise ConfigError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
    return v


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _means(mu1, mu2) -> tuple[float, float]:
    a, b = float(mu1), float(mu2)
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ConfigError(f"Theorem 1 needs finite mu1 < mu2, got mu1={mu1!r}, mu2={mu2!r}")
    return a, b


# ----------------------------------------------------------------------------- Theorem 1


def theorem1_delta_printed(*, beta: float, p: float, mu1: float, mu2: float) -> float:
    """Delta as printed in Theorem 1: (1 - beta+)(1 - p/2)(mu2 - mu1)."""
    return (1.0 - beta) * (1.0 - p / 2.0) * (mu2 - mu1)


def theorem1_delta_derived(*, beta: float, p: float, mu1: float, mu2: float) -> float:
    """The mean shift the setup implies: (1 - beta+)(1 - p)(mu2 - mu1) / 2 (module docstring)."""
    return 0.5 * (1.0 - beta) * (1.0 - p) * (mu2 - mu1)


def theorem1_shift_std(*, beta: float, p: float, mu1: float, mu2: float, sigma: float, n_pos: int,
                       n_neg: int) -> float:
    """Exact standard deviation of f~B - (mu1 + mu2)/2 over training sets."""
    var_pos = sigma**2 * (p + (1 - p) * (beta**2 + (1 - beta) ** 2)) + p * (1 - p) * ((1 - beta) * (mu2 - mu1)) ** 2
    return 0.5 * math.sqrt(var_pos / n_pos + sigma**2 / n_neg)


def theorem1_probability_bound(*, alpha: float, sigma: float, n_pos: int, n_neg: int, beta: float, mu1: float,
                               mu2: float) -> float:
    """The theorem's lower bound on P(|f~B - (mu1+mu2)/2 - Delta| <= alpha), as printed."""
    first = math.exp(-(alpha**2) / sigma**2 * n_pos * n_neg / (n_pos + n_neg))
    second = math.exp(-4.0 * n_pos * alpha**2 / ((1.0 - beta) ** 2 * (mu1 - mu2) ** 2))
    return 1.0 - 2.0 * first - 2.0 * second


def simulate_theorem1(*, mu1: float, mu2: float, sigma: float, beta: float, p: float, n_pos: int, n_neg: int,
                      trials: int, seed: int, chunk_elements: int = 4_000_000) -> np.ndarray:
    """Draw `trials` training sets sample by sample; return f~B - (mu1+mu2)/2 per set, shape (trials,).

    Every positive sample draws its own indicator I ~ Bernoulli(p), Z+ and Z-; the
    similar ones (I = 0) are beta Z+ + (1 - beta) Z-. Same seed -> same array.
    """
    mu1, mu2 = _means(mu1, mu2)
    sigma = _positive("sigma", sigma)
    beta = _unit("beta", beta, open_low=True, open_high=True)
    p = _unit("p", p)
    n_pos, n_neg, trials = _count("n_pos", n_pos), _count("n_neg", n_neg), _count("trials", trials)
    rng = np.random.default_rng(seed)
    out = np.empty(trials)
    step = max(1, chunk_elements // (n_pos + n_neg))
    for start in range(0, trials, step):
        m = min(step, trials - start)
        z_pos = rng.normal(mu1, sigma, size=(m, n_pos))
        z_neg_mix = rng.normal(mu2, sigma, size=(m, n_pos))
        dissimilar = rng.random((m, n_pos)) < p
        x_pos = np.where(dissimilar, z_pos, beta * z_pos + (1.0 - beta) * z_neg_mix)
        x_neg = rng.normal(mu2, sigma, size=(m, n_neg))
        out[start:start + m] = 0.5 * (x_pos.mean(axis=1) + x_neg.mean(axis=1)) - 0.5 * (mu1 + mu2)
    return out


@dataclass(frozen=True)
class Theorem1Row:
    beta: float
    p: float
    n_pos: int
    n_neg: int
    mc_shift: float  # Monte Carlo mean of f~B - (mu1+mu2)/2
    mc_se: float  # its standard error (sample std / sqrt(trials))
    exact_std: float  # exact std of the shift over training sets
    mc_std: float
    delta_derived: float
    delta_printed: float
    alpha: float
    bound: float  # the theorem's probability lower bound (may be <= 0: vacuous)
    coverage_derived: float  # fraction of trials with |shift - delta_derived| <= alpha
    coverage_printed: float

    @property
    def z_derived(self) -> float:
        return (self.mc_shift - self.delta_derived) / self.mc_se

    @property
    def z_printed(self) -> float:
        return (self.mc_shift - self.delta_printed) / self.mc_se


def theorem1_row(*, mu1: float, mu2: float, sigma: float, beta: float, p: float, n_pos: int, n_neg: int,
                 alpha: float, trials: int, seed: int) -> Theorem1Row:
    alpha = _positive("alpha", alpha)
    shifts = simulate_theorem1(mu1=mu1, mu2=mu2, sigma=sigma, beta=beta, p=p, n_pos=n_pos, n_neg=n_neg,
                               trials=trials, seed=seed)
    kw = dict(beta=beta, p=p, mu1=mu1, mu2=mu2)
    d_der, d_pri = theorem1_delta_derived(**kw), theorem1_delta_printed(**kw)
    std = float(shifts.std(ddof=1)) if trials > 1 else float("nan")
    return Theorem1Row(
        beta=float(beta), p=float(p), n_pos=int(n_pos), n_neg=int(n_neg),
        mc_shift=float(shifts.mean()), mc_se=std / math.sqrt(trials), mc_std=std,
        exact_std=theorem1_shift_std(sigma=sigma, n_pos=n_pos, n_neg=n_neg, **kw),
        delta_derived=d_der, delta_printed=d_pri, alpha=alpha,
        bound=theorem1_probability_bound(alpha=alpha, sigma=sigma, n_pos=n_pos, n_neg=n_neg, beta=beta, mu1=mu1,
                                         mu2=mu2),
        coverage_derived=float(np.mean(np.abs(shifts - d_der) <= alpha)),
        coverage_printed=float(np.mean(np.abs(shifts - d_pri) <= alpha)),
    )


# ----------------------------------------------------------------------------- Theorem 2


def _theorem2_inputs(mu1, mu2, cov, p_pos):
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ConfigError(f"mu1 and mu2 must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    d = len(mu1)
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim == 0:
        cov = cov * np.eye(d)
    if cov.shape != (d, d) or not np.allclose(cov, cov.T):
        raise ConfigError(f"cov must be a symmetric {d}x{d} matrix (or a scalar variance), got shape {cov.shape}")
    if np.linalg.eigvalsh(cov).min() <= 0:
        raise ConfigError("cov must be positive definite")
    if np.allclose(mu1, mu2):
        raise ConfigError("mu1 and mu2 must differ")
    p_pos = _unit("p_pos", p_pos, open_low=True, open_high=True)
    return mu1, mu2, cov, p_pos


def theorem2_boundary(*, mu1, mu2, cov, p_pos: float) -> np.ndarray:
    """Eq. (3): the Bayes boundary's crossing of the mean line, shape (d,)."""
    mu1, mu2, cov, p_pos = _theorem2_inputs(mu1, mu2, cov, p_pos)
    diff = mu1 - mu2
    mahalanobis_sq = float(diff @ np.linalg.solve(cov, diff))
    return 0.5 * (mu1 + mu2) - diff * math.log(p_pos / (1.0 - p_pos)) / mahalanobis_sq


def theorem2_shift(*, mu1, mu2, cov, p_pos: float) -> float:
    """Signed distance from (mu1+mu2)/2 to Eq. (3)'s point along u = (mu2-mu1)/||mu2-mu1||."""
    mu1, mu2, cov, p_pos = _theorem2_inputs(mu1, mu2, cov, p_pos)
    u = (mu2 - mu1) / np.linalg.norm(mu2 - mu1)
    return float((theorem2_boundary(mu1=mu1, mu2=mu2, cov=cov, p_pos=p_pos) - 0.5 * (mu1 + mu2)) @ u)


def bayes_posterior_positive(points, *, mu1, mu2, cov, p_pos: float) -> np.ndarray:
    """P(Y=+1 | x) under the model, shape (N,) for points (N, d): for checking Eq. (3) exactly."""
    mu1, mu2, cov, p_pos = _theorem2_inputs(mu1, mu2, cov, p_pos)
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    inv = np.linalg.inv(cov)
    q1 = np.einsum("nd,de,ne->n", points - mu1, inv, points - mu1)
    q2 = np.einsum("nd,de,ne->n", points - mu2, inv, points - mu2)
    log_odds = math.log(p_pos / (1 - p_pos)) - 0.5 * (q1 - q2)
    return 1.0 / (1.0 + np.exp(-log_odds))


def _crossing(weight: np.ndarray, bias: float, mid: np.ndarray, u: np.ndarray) -> float:
    """s with weight.(mid + s u) + bias = 0."""
    return float(-(weight @ mid + bias) / (weight @ u))


def simulate_theorem2(*, mu1, mu2, cov, p_pos: float, n: int, repeats: int, seed: int,
                      estimator: str = "logistic") -> np.ndarray:
    """Estimate the boundary shift along the mean line from `repeats` samples of size n, shape (repeats,).

    Labels are drawn Y=+1 with probability p_pos, X | Y from the class Gaussian.
    `estimator`: ``logistic`` (scikit-learn LogisticRegression without penalty) or ``plugin``
    (sample means, pooled covariance, class frequencies in Eq. (3)).
    """
    mu1, mu2, cov, p_pos = _theorem2_inputs(mu1, mu2, cov, p_pos)
    if estimator not in ("logistic", "plugin"):
        raise ConfigError(f"estimator must be 'logistic' or 'plugin', got {estimator!r}")
    n, repeats = _count("n", n), _count("repeats", repeats)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov)
    mid, u = 0.5 * (mu1 + mu2), (mu2 - mu1) / np.linalg.norm(mu2 - mu1)
    out = np.empty(repeats)
    for r in range(repeats):
        positive = rng.random(n) < p_pos
        if positive.all() or not positive.any():
            raise ConfigError(f"a sample of n={n} drew one class only; raise n")
        points = np.where(positive[:, None], mu1, mu2) + rng.standard_normal((n, len(mu1))) @ chol.T
        if estimator == "logistic":
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(points, positive.astype(int))
            out[r] = _crossing(clf.coef_[0], float(clf.intercept_[0]), mid, u)
        else:
            a, b = points[positive], points[~positive]
            m1, m2 = a.mean(axis=0), b.mean(axis=0)
            pooled = ((a - m1).T @ (a - m1) + (b - m2).T @ (b - m2)) / (n - 2)
            w = np.linalg.solve(pooled, m1 - m2)
            bias = -w @ (0.5 * (m1 + m2)) + math.log(len(a) / len(b))
            out[r] = _crossing(w, float(bias), mid, u)
    return out


@dataclass(frozen=True)
class Theorem2Row:
    case: str
    p_pos: float
    log_prior_ratio: float
    closed_form: float  # Eq. (3)'s shift along the mean line
    logistic: float
    logistic_se: float
    plugin: float
    plugin_se: float

    @property
    def z_logistic(self) -> float:
        return (self.logistic - self.closed_form) / self.logistic_se

    @property
    def z_plugin(self) -> float:
        return (self.plugin - self.closed_form) / self.plugin_se


def theorem2_row(*, case: str, mu1, mu2, cov, p_pos: float, n: int, repeats: int, seed: int) -> Theorem2Row:
    if repeats < 2:
        raise ConfigError(f"repeats must be >= 2 for a standard error, got {repeats}")
    kw = dict(mu1=mu1, mu2=mu2, cov=cov, p_pos=p_pos, n=n, repeats=repeats, seed=seed)
    lo, pl = simulate_theorem2(estimator="logistic", **kw), simulate_theorem2(estimator="plugin", **kw)
    return Theorem2Row(case=case, p_pos=float(p_pos), log_prior_ratio=math.log(p_pos / (1 - p_pos)),
                       closed_form=theorem2_shift(mu1=mu1, mu2=mu2, cov=cov, p_pos=p_pos),
                       logistic=float(lo.mean()), logistic_se=float(lo.std(ddof=1) / math.sqrt(repeats)),
                       plugin=float(pl.mean()), plugin_se=float(pl.std(ddof=1) / math.sqrt(repeats)))


# ----------------------------------------------------------------------------- the study

THEOREM1_SETUP = {"mu1": 0.0, "mu2": 2.0, "sigma": 1.0, "n_neg": 100}
THEOREM1_BETAS = (0.2, 0.5, 0.8)
THEOREM1_PS = (0.0, 0.5, 1.0)
THEOREM1_N_POS = (100, 1000)
THEOREM2_CASES = (
    # (name, mu1, mu2, covariance, priors p+)
    ("general (Eq. 3)", [0.0, 0.0], [2.0, 1.0], [[1.0, 0.3], [0.3, 0.5]], (0.5, 0.7, 0.9, 0.97)),
    ("isotropic (Property 2)", [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], 0.64, (0.5, 0.8, 0.95)),
)


def _rows_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), *(line(r) for r in rows)])


def run_gaussian(out: str | Path | None, *, trials: int = 4000, repeats: int = 20, n: int = 4000, alpha: float = 0.2,
                 seed: int = 0) -> dict:
    """Both theorems on their default grids; logs formula vs simulation, writes gaussian.json/csv/png."""
    import csv
    import io

    trials, repeats, n = _count("--trials", trials), _count("--repeats", repeats), _count("--n", n)
    if trials < 2 or repeats < 2:
        raise ConfigError("--trials and --repeats must be >= 2 (a standard error needs two draws)")
    alpha = _positive("--alpha", alpha)
    t1 = []
    grid = [(n_pos, beta, p) for n_pos in THEOREM1_N_POS for beta in THEOREM1_BETAS for p in THEOREM1_PS]
    for k, (n_pos, beta, p) in enumerate(grid):
        t1.append(theorem1_row(beta=beta, p=p, n_pos=n_pos, alpha=alpha, trials=trials, seed=seed + k,
                               **THEOREM1_SETUP))
    s = THEOREM1_SETUP
    log.info(f"Theorem 1: mu1 {s['mu1']:g}, mu2 {s['mu2']:g}, sigma {s['sigma']:g}, n- {s['n_neg']}, {trials} "
             f"simulated training sets per row, alpha {alpha:g}")
    log.info("  shift = f~B - (mu1+mu2)/2;  printed Delta = (1-b)(1-p/2)(mu2-mu1);  "
             "derived Delta = (1-b)(1-p)(mu2-mu1)/2")
    log.info("  z = (MC mean - Delta) / MC standard error; coverage = fraction of sets with |shift - Delta| <= alpha")
    header = ["n+", "beta", "p", "MC shift", "+-SE", "derived", "z", "printed", "z", "bound", "cov(der)", "cov(pri)"]
    log.info(_rows_table(header, [[str(r.n_pos), f"{r.beta:g}", f"{r.p:g}", f"{r.mc_shift:.4f}", f"{r.mc_se:.4f}",
                                   f"{r.delta_derived:.4f}", f"{r.z_derived:+.1f}", f"{r.delta_printed:.4f}",
                                   f"{r.z_printed:+.0f}", f"{r.bound:.4f}", f"{r.coverage_derived:.4f}",
                                   f"{r.coverage_printed:.4f}"] for r in t1]))
    t2 = []
    for k, (case, mu1, mu2, cov, priors) in enumerate(THEOREM2_CASES):
        for j, p_pos in enumerate(priors):
            t2.append(theorem2_row(case=case, mu1=mu1, mu2=mu2, cov=cov, p_pos=p_pos, n=n, repeats=repeats,
                                   seed=seed + 1000 * (k + 1) + j))
    log.info("")
    log.info(f"Theorem 2: boundary shift s along u = (mu2-mu1)/|mu2-mu1| from (mu1+mu2)/2; closed form "
             f"|mu1-mu2| ln(p+/p-) / M (Eq. 3); Monte Carlo: {repeats} samples of n = {n} per row")
    header = ["case", "p+", "ln(p+/p-)", "closed form", "logistic", "+-SE", "z", "plug-in", "+-SE", "z"]
    log.info(_rows_table(header, [[r.case, f"{r.p_pos:g}", f"{r.log_prior_ratio:.3f}", f"{r.closed_form:.4f}",
                                   f"{r.logistic:.4f}", f"{r.logistic_se:.4f}", f"{r.z_logistic:+.1f}",
                                   f"{r.plugin:.4f}", f"{r.plugin_se:.4f}", f"{r.z_plugin:+.1f}"] for r in t2]))
    result = {
        "study": "gaussian", "paper_sections": ["4.1 Theorem 1", "5.1 Theorem 2, Properties 1-2"],
        "seed": seed, "trials": trials, "repeats": repeats, "n": n, "alpha": alpha,
        "theorem1_setup": dict(THEOREM1_SETUP),
        "theorem1_note": "printed Delta = (1-beta)(1-p/2)(mu2-mu1) contradicts the setup; derived Delta = "
                         "(1-beta)(1-p)(mu2-mu1)/2 is the mean shift the setup implies (docs/studies.md)",
        "theorem1": [{**r.__dict__, "z_derived": r.z_derived, "z_printed": r.z_printed} for r in t1],
        "theorem2_cases": [{"case": c, "mu1": m1, "mu2": m2, "cov": cv, "priors": list(pr)}
                           for c, m1, m2, cv, pr in THEOREM2_CASES],
        "theorem2": [{**r.__dict__, "z_logistic": r.z_logistic, "z_plugin": r.z_plugin} for r in t2],
    }
    if out is not None:
        from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

        out = Path(out)
        atomic_write_json(out / "gaussian.json", result)
        for name, key in (("gaussian_theorem1.csv", "theorem1"), ("gaussian_theorem2.csv", "theorem2")):
            rows = result[key]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(out / name, buffer.getvalue())
        atomic_write_bytes(out / "gaussian.png", gaussian_figure(t1, t2))
        log.info(f"\nwrote {out}/gaussian.json, gaussian_theorem1.csv, gaussian_theorem2.csv, gaussian.png")
    return result


def gaussian_figure(t1: list[Theorem1Row], t2: list[Theorem2Row]) -> bytes:
    """Theorem 1 shift vs beta (p = 0.5) and vs p (beta = 0.5); Theorem 2 shift vs ln(p+/p-)."""
    from ._points import figure, png_bytes

    s = THEOREM1_SETUP
    fig = figure(15.0, 4.2)
    n_pos = max(r.n_pos for r in t1)
    sel = [r for r in t1 if r.n_pos == n_pos]
    grid = np.linspace(0, 1, 101)
    for i, (var, fixed_name, fixed) in enumerate((("beta", "p", 0.5), ("p", "beta", 0.5))):
        ax = fig.add_subplot(1, 3, i + 1)
        rows = sorted((r for r in sel if getattr(r, fixed_name) == fixed), key=lambda r: getattr(r, var))
        kw = {fixed_name: fixed, "mu1": s["mu1"], "mu2": s["mu2"]}
        ax.plot(grid, [theorem1_delta_derived(**{var: g}, **kw) for g in grid], color="#2ca02c",
                label="derived (1-b)(1-p)(mu2-mu1)/2")
        ax.plot(grid, [theorem1_delta_printed(**{var: g}, **kw) for g in grid], color="#d62728", ls="--",
                label="printed (1-b)(1-p/2)(mu2-mu1)")
        ax.errorbar([getattr(r, var) for r in rows], [r.mc_shift for r in rows],
                    yerr=[2 * r.mc_se for r in rows], fmt="o", color="black", ms=5,
                    label=f"Monte Carlo mean (n+={n_pos}, n-={s['n_neg']})")
        ax.set_xlabel("beta+ (similarity degree; smaller = more similar)" if var == "beta"
                      else "p (probability a positive sample is NOT similar)")
        ax.set_ylabel("f~B - (mu1+mu2)/2")
        ax.set_title(f"Theorem 1, {fixed_name} = {fixed:g}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    for case, colour in zip(sorted({r.case for r in t2}), ("#1f77b4", "#9467bd"), strict=False):
        rows = [r for r in t2 if r.case == case]
        x = [r.log_prior_ratio for r in rows]
        ax.plot(x, [r.closed_form for r in rows], color=colour, label=f"{case}: closed form")
        ax.errorbar(x, [r.logistic for r in rows], yerr=[2 * r.logistic_se for r in rows], fmt="o", color=colour,
                    mfc="white", label=f"{case}: logistic MC")
    ax.set_xlabel("ln(p+/p-)")
    ax.set_ylabel("boundary shift towards mu2 (the minority)")
    ax.set_title("Theorem 2", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)
