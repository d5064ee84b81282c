"""Mixup (Zhang et al., ICLR 2018; MiSLAS `train_stage1.py`) and CutMix (Yun et al., ICCV 2019;
clovaai/CutMix-PyTorch `train.py`, commit 2d8eb68faff7fe4962776ad51d175c3b01a25734) as batch transforms."""

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


def cutmix_batch(images: torch.Tensor, target: torch.Tensor, *, alpha: float, generator: torch.Generator,
                 partner: tuple[torch.Tensor, torch.Tensor] | None = None, lam: float | None = None,
                 ceil: bool = False):
    """CutMix as the official train.py: lam ~ Beta(alpha, alpha), partners from a random
    permutation (or the given `partner` batch), a box of side int(size * sqrt(1 - lam)) per dimension centred uniformly
    (clipped), pasted from the partner into every image; lam is then recomputed as
    1 - box area / image area (the official "adjust lambda to exactly match pixel ratio").

    The whether-to-apply draw (train.cutmix_prob) is the caller's (Method.training_step).
    Args:
        images: (B, C, H, W) float. target: (B,) int64.
        partner: (images (B, C, H, W), target (B,)) of a second batch whose box is pasted into
            image i from its own image i, instead of a permutation of this batch (CMO's minority
            batch onto the majority batch as background); no permutation is drawn then.
        lam: a given mixing ratio instead of the Beta draw (nothing drawn for it then; GLMC shares
            one lam between its MixUp and its CutMix).
        ceil: box side ceil(size * sqrt(1 - lam)) (GLMC's `rand_bbox`) instead of int(...).
    Returns:
        (mixed images, target[perm], lam as a float: the fraction of pixels kept from each image)
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if lam is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    if partner is None:
        perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
        source, source_target = images[perm], target[perm]
    else:
        source, source_target = partner
        if source.shape != images.shape or source_target.shape != target.shape:
            raise ValueError(f"the partner batch must match the batch's shape {tuple(images.shape)}, got "
                             f"{tuple(source.shape)}")
    size2, size3 = images.shape[2], images.shape[3]  # the official W = size[2], H = size[3]
    cut_rat = float(np.sqrt(1.0 - lam))
    rounding = (lambda v: int(np.ceil(v))) if ceil else int
    cut2, cut3 = rounding(size2 * cut_rat), rounding(size3 * cut_rat)
    c2 = int(torch.randint(0, size2, (1,), generator=generator))
    c3 = int(torch.randint(0, size3, (1,), generator=generator))
    lo2, hi2 = min(max(c2 - cut2 // 2, 0), size2), min(max(c2 + cut2 // 2, 0), size2)
    lo3, hi3 = min(max(c3 - cut3 // 2, 0), size3), min(max(c3 + cut3 // 2, 0), size3)
    mixed = images.clone()
    mixed[:, :, lo2:hi2, lo3:hi3] = source[:, :, lo2:hi2, lo3:hi3]
    lam = 1.0 - (hi2 - lo2) * (hi3 - lo3) / (size2 * size3)
    return mixed, source_target, lam
