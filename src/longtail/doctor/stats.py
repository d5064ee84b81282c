"""Numbers of a class-count vector: imbalance ratio, effective numbers, shot groups.

- imbalance ratio: n_max / n_min over the classes that have images (empty classes are
  listed separately);
- effective number (Cui et al., CVPR 2019, Eq. 3 / Def. 1): E_n = (1 - beta^n) / (1 - beta),
  the expected volume of n samples; for beta = 0.999 and 0.9999, the values the
  class-balanced loss uses (its weights are 1 / E_n, normalised); E_n <= n, and E_n
  saturates at 1 / (1 - beta) for large n, so the effective imbalance ratio
  E_max / E_min is below n_max / n_min;
- shot groups: `longtail.eval.metrics.shot_groups` (many n > many_threshold, few
  n < few_threshold, medium in between), the same groups the evaluation reports.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..eval.metrics import shot_groups

BETAS = (0.999, 0.9999)


def effective_number(counts, beta: float) -> np.ndarray:
    """E_n = (1 - beta^n) / (1 - beta) per class, float64 (C,); E_0 = 0."""
    if not 0 <= beta < 1:
        raise ConfigError(f"beta must be in [0, 1), got {beta}")
    n = np.asarray(counts, dtype=np.float64)
    return (1.0 - np.power(beta, n)) / (1.0 - beta)


def class_statistics(counts, class_names: list[str], *, many_threshold: int = 100, few_threshold: int = 20,
                     betas=BETAS) -> dict:
    """JSON-ready statistics of (C,) training counts; see the module docstring."""
    if not many_threshold >= few_threshold > 0:
        raise ConfigError(f"thresholds must satisfy many >= few > 0, got {many_threshold} / {few_threshold}")
    n = np.asarray(counts, dtype=np.int64)
    present = np.where(n > 0)[0]
    if len(present) == 0:
        raise ConfigError("no class has any training image")
    hi, lo = int(present[np.argmax(n[present])]), int(present[np.argmin(n[present])])
    groups = shot_groups(n, many_threshold=many_threshold, few_threshold=few_threshold)
    eff = {str(b): effective_number(n, b) for b in betas}
    return {
        "num_classes": int(len(n)),
        "num_images": int(n.sum()),
        "counts": n.tolist(),
        "imbalance_ratio": float(n[hi] / n[lo]),
        "largest": {"class": class_names[hi], "count": int(n[hi])},
        "smallest": {"class": class_names[lo], "count": int(n[lo])},
        "empty_classes": [class_names[i] for i in np.where(n == 0)[0]],
        "effective_number": {b: [round(float(v), 4) for v in e] for b, e in eff.items()},
        "effective_imbalance_ratio": {b: float(e[hi] / e[lo]) for b, e in eff.items()},
        "thresholds": {"many": many_threshold, "few": few_threshold},
        "groups": {g: [class_names[i] for i in idx] for g, idx in groups.items()},
        "group_sizes": {g: int(len(idx)) for g, idx in groups.items()},
    }


def group_of(stats: dict) -> dict[str, str]:
    """{class name: 'many' | 'medium' | 'few'} from `class_statistics` output."""
    return {name: g for g, names in stats["groups"].items() for name in names}
