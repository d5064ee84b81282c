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
