"""Metrics from logits and labels: top-1, shot groups, per class, MCC, NMI, ECE, confusion.

Shot groups follow classifier-balancing's `shot_acc`: each group's score is the mean of
the per-class accuracies of its classes, with groups taken from *training* counts:
many n > many_threshold (100), few n < few_threshold (20), medium in between. The
four-group variant splits few further: rare n < rare_threshold (10), few
rare_threshold <= n < few_threshold. Seed 003 names Many/Medium/Few/Rare for its
ImageNet-LT table without defining the boundaries; these thresholds are our reading.
A group with no class is reported as null. MCC, NMI and the confusion matrix come from
scikit-learn.
"""

from __future__ import annotations

import numpy as np


def shot_groups(class_counts, *, many_threshold: int = 100, few_threshold: int = 20,
                rare_threshold: int | None = None) -> dict[str, np.ndarray]:
    """Class indices per group; with rare_threshold, the four-group variant."""
    n = np.asarray(class_counts)
    groups = {"many": np.where(n > many_threshold)[0],
              "medium": np.where((n >= few_threshold) & (n <= many_threshold))[0]}
    if rare_threshold is None:
        groups["few"] = np.where(n < few_threshold)[0]
    else:
        groups["few"] = np.where((n >= rare_threshold) & (n < few_threshold))[0]
        groups["rare"] = np.where(n < rare_threshold)[0]
    return groups


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, dict]:
    """Top-1 ECE with equal-width confidence bins (Guo et al. 2017).

    Returns (ece, {'bin_confidence', 'bin_accuracy', 'bin_count'}) for reliability diagrams.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    ece = float(np.abs(acc_sum - conf_sum).sum() / max(len(labels), 1))
    safe = np.maximum(count, 1)
    return ece, {"bin_confidence": (conf_sum / safe).tolist(), "bin_accuracy": (acc_sum / safe).tolist(),
                 "bin_count": count.astype(int).tolist()}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _group_means(per_class: np.ndarray, groups: dict) -> dict:
    return {g: (float(np.nanmean(per_class[idx])) if len(idx) else None) for g, idx in groups.items()}


def compute_metrics(logits: np.ndarray, labels: np.ndarray, class_counts, *, many_threshold: int = 100,
                    few_threshold: int = 20, rare_threshold: int = 10, ece_bins: int = 15,
                    class_names: list[str] | None = None) -> dict:
    """All evaluation numbers (accuracies in percent) as a JSON-ready dict.

    Args:
        logits: (N, C) float.
        labels: (N,) int.
        class_counts: (C,) training counts (for the shot groups).
    """
    from sklearn.metrics import confusion_matrix, matthews_corrcoef, normalized_mutual_info_score

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    C = logits.shape[1]
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, labels=np.arange(C))
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan) * 100.0
    three = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    four = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold,
                       rare_threshold=rare_threshold)
    ece, reliability = expected_calibration_error(_softmax(logits), labels, ece_bins)
    out = {
        "num_samples": int(len(labels)),
        "top1": float((preds == labels).mean() * 100.0),
        **_group_means(per_class, three),
        "mean_per_class": float(np.nanmean(per_class)),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "mcc": float(matthews_corrcoef(labels, preds)),
        "nmi": float(normalized_mutual_info_score(labels, preds)),
        "ece": ece,
        "four_group": _group_means(per_class, four),
        "groups": {g: idx.tolist() for g, idx in three.items()},
        "thresholds": {"many": many_threshold, "few": few_threshold, "rare": rare_threshold},
        "train_counts": [int(v) for v in np.asarray(class_counts)],
        "confusion": cm.tolist(),
        "reliability": reliability,
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


def format_summary(name: str, m: dict) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:5.1f}"

    return (f"{name:<22} top1 {f(m['top1'])}  many {f(m['many'])}  medium {f(m['medium'])}  "
            f"few {f(m['few'])}  mcc {m['mcc']:.3f}  nmi {m['nmi']:.3f}  ece {m['ece']:.3f}")
