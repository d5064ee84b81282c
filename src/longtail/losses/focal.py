"""Softmax focal loss as used by LDAM-DRW (Lin et al., ICCV 2017, Eq. 4 on the softmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import choice, number
from .base import Loss


@LOSSES.register("focal")
class FocalLoss(Loss):
    """Softmax focal loss, LDAM-DRW's reading (`losses.py`, `FocalLoss` / `focal_loss`).

    Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 4)
    FL(p_t) = -(1 - p_t)^gamma log p_t, applied to the softmax as LDAM-DRW does:

        l_i = w_{y_i} * CE(z_i, y_i)          (CE with the class weight, reduction none)
        p_i = exp(-l_i)
        loss = (1/B) sum_i (1 - p_i)^gamma * l_i

    `p_source='weighted_ce'` (default, the official code): p is computed from the
    already-weighted l, so with a class weight active p_i = p_{y_i}^{w_{y_i}}, not the
    softmax probability p_y (a quirk of the official code, kept for reproduction).
    `p_source='p_y'`: p_i = softmax(z_i)_{y_i} from the unweighted CE (the paper's
    reading); the loss is then (1/B) sum_i w_{y_i} (1 - p_y)^gamma CE_i.

    Class weight (RW / DRW): multiplies CE_i as above; the batch is reduced by a plain
    mean over B, not divided by sum_i w_{y_i} (LDAM-DRW), unlike `ce`.

    gamma = 0 is exactly F.cross_entropy (unweighted). The modulator is not detached
    (gradient flows through (1 - p)^gamma, as in the official code). LDAM-DRW's script
    hard-codes gamma = 1; the class default there is 0; here gamma defaults to 1.0.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = {"gamma": 0.0}

    def __init__(self, *, class_counts, gamma: float = 1.0, p_source: str = "weighted_ce"):
        super().__init__(class_counts=class_counts)
        self.gamma = number("gamma", gamma, low=0)
        self.p_source = choice("p_source", p_source, ("weighted_ce", "p_y"))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none")
        w = None if self.class_weight is None else self.class_weight.to(logits.dtype)[target]
        weighted = ce if w is None else ce * w
        # p = exp(-l): with 'weighted_ce' l includes w (official); with 'p_y' it is p_y
        p = torch.exp(-(weighted if self.p_source == "weighted_ce" else ce))
        if self.gamma == 0:
            return weighted.mean()
        return ((1.0 - p).pow(self.gamma) * weighted).mean()
