"""Long-tail profiles: how many training images each class keeps.

All profiles put the head first (rank 0) and follow the CIFAR-LT convention of LDAM-DRW
(`imbalance_cifar.py`): counts are truncated with `int()`.

- ``exp``: n_i = int(n_max * (1/rho)^(i/(C-1))). CIFAR-10 (n_max 5000) gives 12,406 /
  13,996 / 20,431 images at rho = 100 / 50 / 10; CIFAR-100 (n_max 500) 10,847 / 12,608 /
  19,573.
- ``step``: the first round(C * step_fraction) classes keep n_max, the others
  int(n_max / rho) (LDAM's 'step' type with step_fraction = 0.5).
- ``pareto``: n_i = int(n_max * (1 + u_i (rho^a - 1))^(-1/a)), u_i = i/(C-1), shape a > 0.
  It starts at n_max, ends at n_max/rho and tends to ``exp`` as a -> 0; larger a drops
  faster after the head and leaves a longer flat tail. ImageNet-LT (OLTR) was *sampled*
  from a Pareto distribution and published only as a file list; with C = 1000,
  n_max = 1280, rho = 256 the default a = 0.337 gives 115,748 images, within 0.1 % of
  ImageNet-LT's 115,846 (its many/medium/few split differs: about 247/312/441 here).
"""

from __future__ import annotations

import numpy as np

from ..config import PARETO_DEFAULT_SHAPE  # the one default: DataConfig.pareto_shape uses it too
from ..errors import ConfigError

__all__ = ["PARETO_DEFAULT_SHAPE", "class_counts"]


def _check(num_classes: int, max_count: int, imbalance_ratio: float) -> None:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(max_count, (int, np.integer)) or max_count < 1:
        raise ConfigError(f"max_count must be a positive integer, got {max_count!r}")
    try:
        ratio = float(imbalance_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"imbalance ratio must be a number >= 1, got {imbalance_ratio!r}") from None
    if not np.isfinite(ratio) or ratio < 1:
        raise ConfigError(f"imbalance ratio must be a number >= 1, got {imbalance_ratio!r}")


def class_counts(
    profile: str,
    num_classes: int,
    max_count: int,
    imbalance_ratio: float,
    *,
    step_fraction: float = 0.5,
    pareto_shape: float = PARETO_DEFAULT_SHAPE,
) -> np.ndarray:
    """Per-class training counts, head first.

    Args:
        profile: ``exp``, ``step`` or ``pareto`` (module docstring).
        num_classes: C.
        max_count: n_max, the head class's count.
        imbalance_ratio: rho = n_max / n_min, >= 1.

    Returns:
        int64 array of shape (C,).

    >>> int(class_counts("exp", 10, 5000, 100).sum())
    12406
    """
    _check(num_classes, max_count, imbalance_ratio)
    rho = float(imbalance_ratio)
    C = int(num_classes)
    if C == 1:
        return np.array([max_count], dtype=np.int64)
    u = np.arange(C) / (C - 1)
    if profile == "exp":
        counts = [int(max_count * (1.0 / rho) ** (i / (C - 1))) for i in range(C)]
    elif profile == "step":
        if not 0 < step_fraction < 1:
            raise ConfigError(f"step_fraction must be in (0, 1), got {step_fraction}")
        n_head = int(round(C * step_fraction))
        counts = [max_count] * n_head + [int(max_count / rho)] * (C - n_head)
    elif profile == "pareto":
        if not pareto_shape > 0:
            raise ConfigError(f"pareto_shape must be > 0, got {pareto_shape}")
        a = float(pareto_shape)
        counts = [int(v) for v in max_count * (1.0 + u * (rho**a - 1.0)) ** (-1.0 / a)]
        counts[-1] = int(max_count / rho)  # exact end point despite rounding
    else:
        raise ConfigError(f"unknown profile '{profile}'; known: exp, step, pareto")
    return np.asarray(counts, dtype=np.int64)
