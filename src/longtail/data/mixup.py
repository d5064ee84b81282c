"""Mixup as a batch transform (Zhang et al., ICLR 2018; MiSLAS `train_stage1.py`)."""

from __future__ import annotations

import numpy as np
import torch


def mixup_batch(images: torch.Tensor, target: torch.Tensor, *, alpha: float, generator: torch.Generator):
    """One lam ~ Beta(alpha, alpha) per batch, partners from a random permutation.

    Args:
        images: (B, C, H, W) float. target: (B,) int64.
    Returns:
        (mixed images lam * x + (1 - lam) * x[perm], target[perm], lam as a float)
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return lam * images + (1.0 - lam) * images[perm], target[perm], lam
