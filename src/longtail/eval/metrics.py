"""Metrics from logits and labels: top-1, top-5, shot groups, per class, MCC, NMI, ECE, confusion.

Top-5 (`top5`) counts an image as correct when its label is among the 5 highest logits
(ties broken toward the lower class index, as argmax breaks them for top-1). It is what
papers report beside top-1 for 100 classes or more. With 5 classes or fewer every label is
among the top 5, so the key is left out of the result (not null, not a trivial 100).

Shot groups follow classifier-balancing's `shot_acc`: each group's score is the mean of
the per-class accuracies of its classes, with groups taken from *training* counts:
many n > many_threshold (100), few n < few_threshold (20), medium in between. The
four-group variant splits few further: rare n < rare_threshold (10), few
rare_threshold <= n < few_threshold. Seed 003 names Many/Medium/Few/Rare for its
ImageNet-LT table without defining the boundaries; these thresholds are our reading.
A group with no class is reported as null. MCC, NMI and the confusion matrix come from
scikit-learn.

A class with no test images (possible when the source brings its own test split) has an
undefined accuracy: its `per_class` entry is null, it is left out of `mean_per_class` and
of its shot group's mean (a group whose classes all lack test images is null), it stays
in `groups` (the groups are of training counts), and `warnings` names it. Top-1, MCC, NMI,
ECE and the confusion matrix are over the test images, so they need no exception (its
confusion row is zeros). No metric is NaN, so eval.json is strict JSON.
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


def mean_defined(values: np.ndarray) -> float | None:
    """Mean of the non-NaN values; None when there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the k highest logits (ties: lower class index first).

    logits (N, C) float, labels (N,) int, 1 <= k <= C.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    if len(labels) == 0:
        return 0.0
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean() * 100.0)


def _group_means(per_class: np.ndarray, groups: dict) -> dict:
    return {g: mean_defined(per_class[idx]) for g, idx in groups.items()}


def no_test_image_warnings(support: np.ndarray, class_names: list[str] | None = None) -> list[str]:
    """One line per class with no test images (support 0): what that does to the metrics."""
    names = class_names if class_names is not None else [str(i) for i in range(len(support))]
    return [f"class '{names[c]}' has no test images: its accuracy is undefined (null) and it is left out of "
            "mean_per_class and the shot-group means" for c in np.flatnonzero(np.asarray(support) == 0)]


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
        **({"top5": top_k_accuracy(logits, labels, 5)} if C > 5 else {}),
        **_group_means(per_class, three),
        "mean_per_class": mean_defined(per_class),
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
        "warnings": no_test_image_warnings(support, class_names),
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


def format_summary(name: str, m: dict) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:5.1f}"

    top5 = f"  top5 {f(m['top5'])}" if "top5" in m else ""  # 6 classes or more
    return (f"{name:<22} top1 {f(m['top1'])}{top5}  many {f(m['many'])}  medium {f(m['medium'])}  "
            f"few {f(m['few'])}  mcc {m['mcc']:.3f}  nmi {m['nmi']:.3f}  ece {m['ece']:.3f}")
