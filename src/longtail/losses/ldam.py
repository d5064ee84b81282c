"""LDAM loss (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss", NeurIPS 2019)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss


def ldam_margins(class_counts, max_m: float) -> torch.Tensor:
    """m_c = n_c^(-1/4), rescaled so that max_c m_c = max_m (paper: Delta_j = C / n_j^(1/4); `losses.py`).

    The rarest class gets exactly max_m. A class with zero count (no training image, so
    never a target) gets max_m and is left out of the rescaling, which the official code
    would turn into inf / NaN. Returns float32 (C,).
    """
    n = np.asarray(class_counts, dtype=np.float64)
    seen = n > 0
    m = np.full(n.shape, float(max_m))
    if seen.any():
        raw = np.power(n[seen], -0.25)
        m[seen] = raw * (max_m / raw.max())
    return torch.tensor(m, dtype=torch.float32)


@LOSSES.register("ldam")
class LDAMLoss(Loss):
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019, Sec. 3, the LDAM loss).

    As LDAM-DRW's `LDAMLoss`: margins m_c = n_c^(-1/4) rescaled so max_c m_c = max_m
    (buffer `margins`, (C,)); the margin is subtracted from the target logit only, before
    scaling, and s multiplies all logits:

        z_hat_ij = z_ij - m_{y_i} [j = y_i]
        loss = CE(s * z_hat, y, weight = class_weight)

    Class weight (RW / DRW, as LDAM-DRW's `weight=per_cls_weights`): PyTorch's weighted
    mean sum_i w_{y_i} l_i / sum_i w_{y_i}.

    Meant for the cosine head (`model.head: cosine`, z in [-1, 1]); prediction is the
    argmax of the raw logits z (no margin, no s). max_m = 0 with s = 1 is plain CE.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {"max_m": 0.0, "s": 1.0}  # no margin, logits unscaled

    def __init__(self, *, class_counts, max_m: float = 0.5, s: float = 30.0):
        super().__init__(class_counts=class_counts)
        self.max_m = number("max_m", max_m, low=0)
        self.s = number("s", s, low=0, low_open=True)
        self.register_buffer("margins", ldam_margins(class_counts, self.max_m))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.margins.to(logits.dtype)[target]  # (B,)
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        adjusted = logits - onehot * m[:, None]
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(self.s * adjusted, target, weight=weight)
