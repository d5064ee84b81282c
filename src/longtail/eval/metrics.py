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

Many classes (docs/evaluation.md): above rundir.INLINE_MAX_CLASSES (100) classes the
confusion matrix is a scipy.sparse csr_matrix built from (label, prediction) pairs, never the
dense C x C array, MCC is computed from its row and column sums (sklearn's multiclass formula),
and softmax, ECE and top-5 run over blocks of rows, so memory stays O(N x C) for the logits
alone; at or below it the numbers come from scikit-learn as before (bitwise the same).

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
    return _ece_from(probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64), len(labels), bins)


ROW_BLOCK = 2048  # rows of logits converted to float64 at a time


def _confidence_and_prediction(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the top softmax probability and its class, over blocks of ROW_BLOCK rows (each row
    alone, so the values equal those of one softmax over the whole array)."""
    conf, pred = [], []
    for start in range(0, len(logits), ROW_BLOCK):
        probs = _softmax(np.asarray(logits[start:start + ROW_BLOCK], dtype=np.float64))
        conf.append(probs.max(axis=1))
        pred.append(probs.argmax(axis=1))
    return (np.concatenate(conf) if conf else np.zeros(0), np.concatenate(pred) if pred else np.zeros(0, np.int64))


def calibration(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, dict]:
    """expected_calibration_error of softmax(logits), without holding the (N, C) probabilities."""
    conf, pred = _confidence_and_prediction(logits)
    return _ece_from(conf, (pred == labels).astype(np.float64), len(labels), bins)


def _ece_from(conf: np.ndarray, correct: np.ndarray, n: int, bins: int) -> tuple[float, dict]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    ece = float(np.abs(acc_sum - conf_sum).sum() / max(n, 1))
    safe = np.maximum(count, 1)
    return ece, {"bin_confidence": (conf_sum / safe).tolist(), "bin_accuracy": (acc_sum / safe).tolist(),
                 "bin_count": count.astype(int).tolist()}


def sparse_confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int):
    """The confusion matrix (rows true, columns predicted) as a scipy.sparse csr_matrix of int64."""
    from scipy import sparse

    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return sparse.csr_matrix((np.ones(len(labels), dtype=np.int64), (labels, preds)),
                             shape=(num_classes, num_classes))


def mcc_from_confusion(cm) -> float:
    """Multiclass Matthews correlation (Gorodkin 2004) from a confusion matrix's sums, as
    sklearn.metrics.matthews_corrcoef computes it (0.0 where it is undefined)."""
    t_sum = np.asarray(cm.sum(axis=1), dtype=np.float64).ravel()
    p_sum = np.asarray(cm.sum(axis=0), dtype=np.float64).ravel()
    n_correct, n = float(cm.diagonal().sum()), float(t_sum.sum())
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n**2 - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


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
    hits = 0
    for start in range(0, len(labels), ROW_BLOCK):  # the label's rank: larger logits, then equal ones before it
        block, y = logits[start:start + ROW_BLOCK], labels[start:start + ROW_BLOCK]
        own = np.take_along_axis(block, y[:, None], axis=1)
        ties = (block == own) & (np.arange(block.shape[1])[None, :] < y[:, None])
        hits += int((((block > own) | ties).sum(axis=1) < k).sum())
    return float(hits / len(labels) * 100.0)


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

    from ..rundir import INLINE_MAX_CLASSES

    labels = np.asarray(labels, dtype=np.int64)
    C = np.shape(logits)[1]
    small = C <= INLINE_MAX_CLASSES
    logits = np.asarray(logits, dtype=np.float64) if small else np.asarray(logits)
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, labels=np.arange(C)) if small else sparse_confusion(labels, preds, C)
    support = np.asarray(cm.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, cm.diagonal() / np.maximum(support, 1), np.nan) * 100.0
    three = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    four = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold,
                       rare_threshold=rare_threshold)
    ece, reliability = (expected_calibration_error(_softmax(logits), labels, ece_bins) if small
                        else calibration(logits, labels, ece_bins))
    out = {
        "num_samples": int(len(labels)),
        "top1": float((preds == labels).mean() * 100.0),
        **({"top5": top_k_accuracy(logits, labels, 5)} if C > 5 else {}),
        **_group_means(per_class, three),
        "mean_per_class": mean_defined(per_class),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "mcc": float(matthews_corrcoef(labels, preds)) if small else mcc_from_confusion(cm),
        "nmi": float(normalized_mutual_info_score(labels, preds)),
        "ece": ece,
        "four_group": _group_means(per_class, four),
        "groups": {g: idx.tolist() for g, idx in three.items()},
        "thresholds": {"many": many_threshold, "few": few_threshold, "rare": rare_threshold},
        "train_counts": [int(v) for v in np.asarray(class_counts)],
        "confusion": cm.tolist() if small else cm,  # above INLINE_MAX_CLASSES: a csr_matrix (RunDir.write_eval)
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
