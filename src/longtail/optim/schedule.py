"""Per-epoch learning-rate schedules.

`step` reproduces LDAM-DRW's `adjust_learning_rate` (e = 0-idx epoch + 1):
lr = base * e / warmup while e <= warmup, then base * decay^k where k counts the
milestones m with e > m. With milestones [160, 180] and decay 0.01: 0.1 up to epoch 160,
1e-3 for 0-idx epochs 160-179, 1e-5 after. `cosine` warms up the same way, then follows
min_lr + (base - min_lr) * (1 + cos(pi * t)) / 2 with t the fraction of post-warm-up
epochs done. `constant` keeps base (after warm-up).
"""

from __future__ import annotations

import math


def learning_rate(epoch: int, *, base_lr: float, epochs: int, schedule: str = "step", warmup_epochs: int = 0,
                  milestones=(), decay: float = 0.01, min_lr: float = 0.0) -> float:
    e = epoch + 1
    if warmup_epochs and e <= warmup_epochs:
        return base_lr * e / warmup_epochs
    if schedule == "step":
        return base_lr * decay ** sum(e > m for m in milestones)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1)
        t = (epoch - warmup_epochs) / span
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule '{schedule}'; known: step, cosine, constant")
