"""Generalized re-weighting (G-RW) loss of DisAlign (Zhang et al., "Distribution Alignment: A
Unified Framework for Long-tail Visual Recognition", CVPR 2021, Sec. 3, "generalized
re-weighting").

Read against the official code: Megvii-BaseDetection/cvpods `cvpods/modeling/losses/grw_loss.py`
(`GRWCrossEntropyLoss`, commit 2deea5dc659371318c8a570c644201d913a83027), used by
Megvii-BaseDetection/DisAlign (commit a2fc3500a108cb83e3942293a5675c97ab3a2c6e).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import choice, number
from .base import Loss


def grw_weights(class_counts, rho: float) -> torch.Tensor:
    """w_c = (1 / r_c)^rho with r_c = n_c / sum_k n_k, normalised so that sum_c w_c = C
    (as `GRWCrossEntropyLoss._init_weights`). rho = 0 gives all ones, rho = 1 inverse frequency.

    A class with no training image (r_c = 0, never a target) would get an infinite weight in the
    official code; it gets weight 0 here and is left out of the normalisation (the weights of
    the other classes sum to C). Returns float32 (C,).
    """
    n = np.asarray(class_counts, dtype=np.float64)
    seen = n > 0
    w = np.zeros(n.shape)
    if seen.any():
        ratio = n[seen] / n[seen].sum()
        w[seen] = np.power(1.0 / ratio, rho)
        w = w / w.sum() * len(n)
    return torch.tensor(w, dtype=torch.float32)


@LOSSES.register("grw")
class GRWLoss(Loss):
    """Generalized re-weighted cross-entropy (DisAlign Sec. 3, the G-RW loss; the paper's equation
    numbers were not checked here, the paper text not being at hand: read from the code).

    The paper aligns the model's p_m(y|x) with a reference distribution that re-weights the
    (one-hot) empirical target by w_y (the KL to it reduces to a class-weighted CE):

        w_c = (1 / r_c)^rho / normaliser,   r_c = n_c / N   (buffer `grw_weight`, (C,))
        loss = sum_i w_{y_i} * CE(z_i, y_i) / sum_i w_{y_i}      ('weighted_mean', default)

    Reading chosen (official code): `GRWCrossEntropyLoss` is `F.cross_entropy(weight=w)` with
    the default 'mean' reduction, i.e. PyTorch's per-batch weighted mean, so the weights'
    normalisation (sum C in the code, sum 1 in the paper) cancels. The paper's plain average
    (1 / B) sum_i w_{y_i} CE_i with weights summing to C is `reduction: mean`. There is no
    prior (logit) adjustment: the balanced target comes from the weights alone, and inference
    uses the calibrated logits as they are.

    rho: the official classification config (ImageNet-LT, `GRW_SCALE`) uses 1.2, the
    semantic-segmentation config 0.2; the code's own default is 1.0. rho = 0 is plain CE.
    A re-weighting schedule's `class_weight` (reweight.scheme), if set, multiplies w.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {"rho": 0.0}  # all weights 1: F.cross_entropy (either reduction)

    def __init__(self, *, class_counts, rho: float = 1.2, reduction: str = "weighted_mean"):
        super().__init__(class_counts=class_counts)
        self.rho = number("rho", rho, low=0)
        self.reduction = choice("reduction", reduction, ("weighted_mean", "mean"))
        self.register_buffer("grw_weight", grw_weights(class_counts, self.rho))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.grw_weight.to(logits.dtype, copy=True)  # a copy: the buffer may be reloaded in place
        if self.class_weight is not None:
            weight = weight * self.class_weight.to(logits.dtype)
        if self.reduction == "weighted_mean":
            return F.cross_entropy(logits, target, weight=weight)
        return (weight[target] * F.cross_entropy(logits, target, reduction="none")).mean()
