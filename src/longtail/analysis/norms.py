"""Per-class norms of a linear classifier and their spread (seed 000, Sec. 5.3, Table 2, Fig. 6).

For a linear head W (C, D), class c's norm is ||w_c||_2. The paper's Table 2 reports "the
variance of the classifier weights' norms" without naming the estimator or a scale; here it
is the population variance (ddof 0) of the C norms, in the head's own units. Because the
units depend on training (weight decay, epochs), the scale-free coefficient of variation
(std / mean), the max / min ratio and Spearman's rank correlation with the training counts
are reported beside it. Theorem 3 discards the bias; it is reported, not used.

tau-normalisation (Kang et al. 2020; Property 3 of the paper): w_c / ||w_c||^tau, row-wise,
as `TauNormLinear`; its norms are ||w_c||^(1 - tau), so tau = 1 gives unit norms (variance 0)
and tau = 0 leaves W unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CheckpointError, ConfigError

# methods whose classifier is not a plain (C, D) linear layer, with the reason
NO_LINEAR_HEAD = {
    "ssp": "an SSP pre-training run: its head predicts 4 rotations, not classes (analyze a run fine-tuned from it)",
    "ncm": "a nearest-class-mean run: it has class centroids, not a linear classifier",
    "lws": "an LWS run: its classifier is the frozen stage-1 layer times learned per-class scales "
           "(analyze its stage 1)",
}


def tau_normalise(weight: np.ndarray, tau: float) -> np.ndarray:
    """w_c / ||w_c||_2^tau for every row of a (C, D) weight (TauNormLinear's effective weight)."""
    weight = np.asarray(weight, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    return weight / norms ** float(tau)


def norm_statistics(norms, class_counts) -> dict:
    """Spread of per-class norms (C,) and their relation to the training counts (C,).

    Returns mean, variance (population, ddof 0), std, cv (std / mean), max_over_min and
    spearman_vs_count (None when either side is constant), as floats.
    """
    from scipy.stats import spearmanr

    norms = np.asarray(norms, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    if norms.ndim != 1 or norms.shape != counts.shape or len(norms) < 1:
        raise ValueError(f"need norms and class_counts of the same length C >= 1, got {norms.shape} and {counts.shape}")
    mean, std = float(norms.mean()), float(norms.std())
    rho = None
    if len(norms) > 1 and np.ptp(norms) > 1e-12 * max(abs(mean), 1e-12) and np.ptp(counts) > 0:
        rho = float(spearmanr(norms, counts).statistic)
    return {"mean": mean, "variance": float(norms.var()), "std": std, "cv": std / mean if mean > 0 else None,
            "max_over_min": float(norms.max() / norms.min()) if norms.min() > 0 else None,
            "spearman_vs_count": None if rho is None or math.isnan(rho) else rho}


def weight_norm_report(weight, class_counts, *, taus=()) -> dict:
    """Norms of a (C, D) linear head and their statistics; for every tau in `taus`, the same
    after tau-normalisation.

    Returns {'l2': [C floats, class order], **norm_statistics, 'tau_normalised': [{'tau',
    'l2', **norm_statistics}, ...]}.
    """
    weight = np.asarray(weight, dtype=np.float64)
    counts = np.asarray(class_counts)
    if weight.ndim != 2 or weight.shape[0] != len(counts):
        raise ValueError(f"weight must be (C, D) with C = {len(counts)} classes, got shape {weight.shape}")
    norms = np.linalg.norm(weight, axis=1)
    out = {"l2": norms.tolist(), **norm_statistics(norms, counts), "tau_normalised": []}
    for tau in taus:
        tn = np.linalg.norm(tau_normalise(weight, tau), axis=1)
        out["tau_normalised"].append({"tau": float(tau), "l2": tn.tolist(), **norm_statistics(tn, counts)})
    return out


def linear_head_problem(config: dict) -> str | None:
    """Why the run described by `config` (a config.yaml mapping) has no linear class head, or None."""
    method = (config.get("method") or {}).get("name", "standard")
    if method in NO_LINEAR_HEAD:
        return NO_LINEAR_HEAD[method]
    head = (config.get("model") or {}).get("head", "linear")
    if head != "linear":
        return (f"its head is '{head}' (model.head): a cosine classifier divides by ||w_c||, so raw weight norms "
                "do not act on its logits; weight norms need model.head linear")
    return None


def check_linear_head(weight: np.ndarray | None, num_classes: int, run_dir) -> np.ndarray:
    """The (C, D) head weight of a FeatureSet, or a CheckpointError naming the run."""
    if weight is None or weight.ndim != 2 or weight.shape[0] != num_classes:
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{run_dir}: no linear head of {num_classes} classes in its features "
                              f"(head weight {shape})")
    return weight


def cached_weight_norms(run_dir, config: dict, *, posthoc: dict | None = None) -> dict | None:
    """Weight norms from the run's fresh feature cache (RUN_DIR/features/last.npz, written by
    `longtail features` or `longtail analyze`), for the report; None when there is no fresh
    cache or the run has no linear class head. Nothing is extracted here.

    Returns weight_norm_report(...) plus 'train_counts' and 'tau' (the run's tau for a
    tau_norm run, else None; its normalised norms are the first 'tau_normalised' entry).
    """
    from ..features import _load_cache, _stamp
    from ..rundir import RunDir

    if linear_head_problem(config) is not None:
        return None
    run = RunDir(run_dir)
    try:
        fs = _load_cache(run.features_cache("last"), _stamp(run.require_checkpoint("last")))
    except (CheckpointError, ConfigError, OSError):
        return None
    weight = None if fs is None else fs.head.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != len(fs.class_counts):
        return None
    tau = run_tau(config, posthoc)
    out = weight_norm_report(weight, fs.class_counts, taus=() if tau is None else (tau,))
    return {**out, "train_counts": [int(v) for v in fs.class_counts], "tau": tau}


def run_tau(config: dict, posthoc: dict | None) -> float | None:
    """The tau a tau_norm run selected (posthoc.json), else None."""
    method = (config.get("method") or {}).get("name")
    if method == "tau_norm" and posthoc and isinstance(posthoc.get("tau"), (int, float)):
        return float(posthoc["tau"])
    return None
