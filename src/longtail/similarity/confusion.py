"""Confusable head-to-tail pairs from test predictions (seed 001, Table 1).

For each tail class t, the head classes its test images are most often predicted as:

    error(t -> h) = 100 * #{test images of t predicted as h} / #{test images of t}

- tail classes: the `tail_fraction` rarest classes by training count (at least one;
  ties in class-index order), listed rarest first;
- heads of t: classes h with n_h >= min_ratio * n_t ("head" relative to the tail, as
  `doctor.confusable`, so the table works when the many / few groups are empty, e.g.
  CIFAR-10-LT has no few-shot class);
- for each tail, the `top` heads with the largest error (> 0), largest first, ties in
  class-index order.

`compare_errors` adds a second run's error for the same pairs (the paper's "Error for
SWRM" column next to CE's).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def confusion_counts(logits: np.ndarray, labels: np.ndarray, num_classes: int):
    """(C, C) int64: rows true class, columns predicted class (scikit-learn); above
    rundir.INLINE_MAX_CLASSES a scipy.sparse csr_matrix (never the dense C x C array)."""
    from sklearn.metrics import confusion_matrix

    from ..eval.metrics import sparse_confusion
    from ..rundir import INLINE_MAX_CLASSES

    preds = np.asarray(logits).argmax(axis=1)
    if num_classes > INLINE_MAX_CLASSES:
        return sparse_confusion(labels, preds, num_classes)
    return confusion_matrix(np.asarray(labels), preds, labels=np.arange(num_classes)).astype(np.int64)


def _csr(confusion):
    """The confusion as a csr_matrix (dense arrays and sparse matrices alike)."""
    from scipy import sparse

    return sparse.csr_matrix(confusion)


def tail_classes(class_counts, tail_fraction: float = 0.5) -> np.ndarray:
    """The max(1, floor(tail_fraction * C)) rarest classes, rarest first (ties: class index)."""
    if not 0 < tail_fraction <= 1:
        raise ConfigError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    n = np.asarray(class_counts)
    k = max(1, int(np.floor(tail_fraction * len(n))))
    return np.argsort(n, kind="stable")[:k]


def head_to_tail_errors(confusion: np.ndarray, class_counts, class_names: list[str], *,
                        tail_fraction: float = 0.5, min_ratio: float = 2.0, top: int = 2) -> list[dict]:
    """Rows {tail, tail_count, head, head_count, test_images, predicted_as, error} (module docstring)."""
    if not np.isfinite(min_ratio) or min_ratio < 1:
        raise ConfigError(f"min_ratio must be >= 1, got {min_ratio}")
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    cm = _csr(confusion)  # a tail's row: only its non-zero cells are visited
    n = np.asarray(class_counts)
    rows = []
    for t in tail_classes(n, tail_fraction).tolist():
        start, end = cm.indptr[t], cm.indptr[t + 1]
        cols, vals = cm.indices[start:end], cm.data[start:end]
        support = int(vals.sum())
        if support == 0:
            continue
        cell = {int(h): int(v) for h, v in zip(cols, vals, strict=True) if v > 0}
        heads = [h for h in sorted(cell) if h != t and n[h] >= min_ratio * n[t]]
        heads.sort(key=lambda h: (-cell[h], h))
        for h in heads[:top]:
            rows.append({"tail": class_names[t], "tail_index": t, "tail_count": int(n[t]),
                         "head": class_names[h], "head_index": h, "head_count": int(n[h]),
                         "test_images": support, "predicted_as": cell[h],
                         "error": round(100.0 * cell[h] / support, 4)})
    return rows


def compare_errors(rows: list[dict], confusion: np.ndarray, name: str) -> list[dict]:
    """Copies of `rows` with `error_<name>` (the same pair's error under another confusion
    matrix) and `change_<name>` (that minus `error`)."""
    cm = _csr(confusion)
    out = []
    for r in rows:
        t, h = r["tail_index"], r["head_index"]
        support = int(cm[t].sum())
        err = round(100.0 * int(cm[t, h]) / support, 4) if support else None
        out.append({**r, f"error_{name}": err,
                    f"change_{name}": None if err is None else round(err - r["error"], 4)})
    return out


def format_table(rows: list[dict], *, compare: list[str] = ()) -> str:
    """The table as the paper prints it: Label (n) | Prediction (n) | Error (%) [| other (change)]."""
    if not rows:
        return "(no tail class is predicted as a head class on the test set)"
    label_w = max([len(f"{r['tail']} ({r['tail_count']})") for r in rows] + [len("label (train n)")]) + 2
    pred_w = max([len(f"{r['head']} ({r['head_count']})") for r in rows] + [len("prediction (train n)")]) + 2
    head = f"{'label (train n)':<{label_w}}{'prediction (train n)':<{pred_w}}{'error %':>8}"
    for name in compare:
        head += f"  {('error % ' + name):>24}"
    lines = [head]
    last = None
    for r in rows:
        label = f"{r['tail']} ({r['tail_count']})" if r["tail"] != last else ""
        last = r["tail"]
        line = f"{label:<{label_w}}{r['head'] + ' (' + str(r['head_count']) + ')':<{pred_w}}{r['error']:>8.1f}"
        for name in compare:
            e, d = r.get(f"error_{name}"), r.get(f"change_{name}")
            line += f"  {'-':>24}" if e is None else f"  {f'{e:.1f} ({d:+.1f})':>24}"
        lines.append(line)
    return "\n".join(lines)
