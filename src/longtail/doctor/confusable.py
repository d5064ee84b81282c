"""Confusable head-tail class pairs from prototype similarity.

The category-similarity effect (seeds 000 and 001): a rare class suffers most when it
looks like a class with many more images, because the classifier's bias toward the
frequent class pulls the rare one's images across the boundary. Given a trained run as
a feature extractor (any run: it need not have been trained on this dataset):

1. prototypes: p_c = mean of the pooled pre-logit features
   (`model.forward_head(features, pre_logits=True)`, eval mode, the run's preprocessing)
   of up to `max_per_class` training images of class c (a seeded random choice);
2. similarity: cosine(p_h, p_t) (scikit-learn `cosine_similarity`);
3. pairs: every (head h, tail t) with n_h >= min_ratio * n_t, i.e. "head" and "tail" are
   relative to each other (the larger and the smaller class of the pair, by training
   count), not the many / few groups, so the ranking works for any dataset size;
   ranked by similarity, highest first (ties: larger count ratio first).
"""

from __future__ import annotations


import numpy as np

from ..errors import ConfigError


def sample_per_class(labels: np.ndarray, num_classes: int, max_per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted positions: at most `max_per_class` of each class, chosen with RandomState(seed)."""
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
    rs = np.random.RandomState(seed)
    labels = np.asarray(labels)
    keep = []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        keep.append(idx if len(idx) <= max_per_class else rs.choice(idx, max_per_class, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def rank_pairs(prototypes: np.ndarray, counts, *, min_ratio: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head (P,), tail (P,), similarity (P,)) of every pair with n_head >= min_ratio * n_tail,
    most similar first, ties by larger count ratio (module docstring). Classes without a
    prototype are left out."""
    from sklearn.metrics.pairwise import cosine_similarity

    if not np.isfinite(min_ratio) or min_ratio < 1:
        raise ConfigError(f"min_ratio must be >= 1, got {min_ratio}")
    n = np.asarray(counts, dtype=np.float64)
    ok = np.isfinite(prototypes).all(axis=1) & (n > 0)
    sim = np.zeros((len(n), len(n)))
    if ok.sum() >= 2:
        sim[np.ix_(ok, ok)] = cosine_similarity(prototypes[ok])
    mask = (n[:, None] >= min_ratio * n[None, :]) & ok[:, None] & ok[None, :]
    h, t = np.nonzero(mask)
    s, ratio = sim[h, t], n[h] / np.maximum(n[t], 1)
    order = np.lexsort((-ratio, -s))
    return h[order], t[order], s[order]


PAIR_BLOCK = 1024  # head rows per block of `confusable_pairs` (above: never a C x C matrix)


def _pair_key(s: np.ndarray, ratio: np.ndarray, h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Positions sorting pairs as `rank_pairs` does: similarity, then ratio, descending; then (h, t)."""
    return np.lexsort((t, h, -ratio, -s))


def confusable_pairs(prototypes: np.ndarray, counts, *, min_ratio: float = 2.0, top: int = 10,
                     block: int = PAIR_BLOCK) -> dict:
    """What `confusable_report` needs of `rank_pairs`, in bounded memory: {"top": (h, t, s) of
    the `top` first pairs, "first": (h, t, s) of each tail's first pair, in ranking order,
    "num_pairs"}. Up to `block` classes it is `rank_pairs` itself; above, head rows are taken
    `block` at a time (block x C similarities), keeping the best `top` candidates and each
    tail's best head, so 8,142 classes never build the 8,142^2 matrix or its ~33 M pairs."""
    from sklearn.metrics.pairwise import cosine_similarity

    n = np.asarray(counts, dtype=np.float64)
    C = len(n)
    if C <= block:
        h, t, s = rank_pairs(prototypes, n, min_ratio=min_ratio)
        first = first_per_tail(t)
        return {"top": (h[:top], t[:top], s[:top]), "first": (h[first], t[first], s[first]), "num_pairs": len(h)}
    if not np.isfinite(min_ratio) or min_ratio < 1:
        raise ConfigError(f"min_ratio must be >= 1, got {min_ratio}")
    ok = np.isfinite(prototypes).all(axis=1) & (n > 0)
    cand = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)]
    best = {"s": np.full(C, -np.inf), "r": np.full(C, -np.inf), "h": np.full(C, -1)}
    num = 0
    cols = np.flatnonzero(ok)
    for start in range(0, C, block):
        rows = np.arange(start, min(start + block, C))
        rows = rows[ok[rows]]
        if len(rows) == 0 or ok.sum() < 2:
            continue
        sim = cosine_similarity(prototypes[rows], prototypes[cols])  # (b, C_ok)
        mask = n[rows][:, None] >= min_ratio * n[cols][None, :]
        ratio = n[rows][:, None] / np.maximum(n[cols][None, :], 1)
        num += int(mask.sum())
        _merge_top(cand, sim, ratio, mask, rows, cols, top)
        _merge_best(best, sim, ratio, mask, rows, cols)
    h, t, s = cand
    order = _pair_key(s, n[h] / np.maximum(n[t], 1), h, t)[:top]
    tails = np.flatnonzero(best["h"] >= 0)
    fh, fs = best["h"][tails], best["s"][tails]
    first = _pair_key(fs, n[fh] / np.maximum(n[tails], 1), fh, tails)
    return {"top": (h[order], t[order], s[order]), "first": (fh[first], tails[first], fs[first]), "num_pairs": num}


def _merge_top(cand: list, sim, ratio, mask, rows, cols, top: int) -> None:
    """Add this block's pairs that can be among the `top` first (similarity >= its top-th) to `cand`."""
    values = sim[mask]
    if len(values) == 0:
        return
    kth = np.partition(values, len(values) - min(top, len(values)))[len(values) - min(top, len(values))]
    i, j = np.nonzero(mask & (sim >= kth))
    h, t, s = rows[i], cols[j], sim[i, j]
    keep = _pair_key(s, ratio[i, j], h, t)[:top]
    cand[0], cand[1], cand[2] = (np.concatenate([cand[0], h[keep]]), np.concatenate([cand[1], t[keep]]),
                                 np.concatenate([cand[2], s[keep]]))


def _merge_best(best: dict, sim, ratio, mask, rows, cols) -> None:
    """Each tail's best head so far by (similarity, ratio) descending, then the lower head index
    (blocks come in head order, so a later block wins only when strictly better)."""
    s_m = np.where(mask, sim, -np.inf)
    top_s = s_m.max(axis=0)
    is_best = mask & (s_m == top_s)
    r_m = np.where(is_best, ratio, -np.inf)
    top_r = r_m.max(axis=0)
    pick = np.argmax(is_best & (r_m == top_r), axis=0)  # first row: the lowest head index
    has = mask.any(axis=0)
    old_s, old_r = best["s"][cols], best["r"][cols]
    better = has & ((top_s > old_s) | ((top_s == old_s) & (top_r > old_r)))
    idx = cols[better]
    best["s"][idx], best["r"][idx], best["h"][idx] = top_s[better], top_r[better], rows[pick[better]]


def describe_pairs(head: np.ndarray, tail: np.ndarray, sim: np.ndarray, counts, class_names: list[str],
                   groups: dict[str, str] | None = None) -> list[dict]:
    """JSON-ready rows of ranked pairs."""
    n = np.asarray(counts)
    rows = []
    for h, t, s in zip(head.tolist(), tail.tolist(), sim.tolist(), strict=True):
        row = {"head": class_names[h], "tail": class_names[t], "similarity": round(float(s), 6),
               "head_count": int(n[h]), "tail_count": int(n[t]), "ratio": round(float(n[h] / n[t]), 4)}
        if groups:
            row["head_group"], row["tail_group"] = groups.get(class_names[h]), groups.get(class_names[t])
        rows.append(row)
    return rows


def first_per_tail(tail: np.ndarray) -> np.ndarray:
    """Positions in the ranking of each tail class's most similar head, in ranking order."""
    _, first = np.unique(tail, return_index=True)
    return np.sort(first)
