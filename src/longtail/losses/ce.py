"""Cross-entropy and the class-balanced softmax loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from .base import Loss, effective_number_weights


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Softmax cross-entropy, optionally class-weighted.

    With a class weight w (set by RW / DRW), PyTorch's weighted mean is used, as in
    LDAM-DRW: sum_i w_{y_i} l_i / sum_i w_{y_i}.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    def __init__(self, *, class_counts):
        super().__init__(class_counts=class_counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=weight)


@LOSSES.register("class_balanced")
class ClassBalancedSoftmax(Loss):
    """Class-balanced softmax cross-entropy (Cui et al., CVPR 2019, Eq. 4 with softmax).

    w_c = (1 - beta) / (1 - beta^n_c), normalised to sum C (effective number of samples).
    `reduction='batch'` (default) follows the official TF code
    (`tf.losses.softmax_cross_entropy` with SUM_BY_NONZERO_WEIGHTS):
    loss = (1/B) sum_i w_{y_i} CE_i. `reduction='weights'` divides by sum_i w_{y_i} instead
    (PyTorch's weighted mean). A re-weighting schedule's class weight, if also set,
    multiplies in.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    def __init__(self, *, class_counts, beta: float = 0.9999, reduction: str = "batch"):
        super().__init__(class_counts=class_counts)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if reduction not in ("batch", "weights"):
            raise ValueError(f"reduction must be 'batch' or 'weights', got {reduction!r}")
        self.beta, self.reduction = float(beta), reduction
        self.register_buffer("cb_weight", effective_number_weights(class_counts, self.beta))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.cb_weight.to(logits.dtype)
        if self.class_weight is not None:
            w = w * self.class_weight.to(logits.dtype)
        per_sample = F.cross_entropy(logits, target, reduction="none") * w[target]
        denom = per_sample.new_tensor(float(target.numel())) if self.reduction == "batch" else w[target].sum()
        return per_sample.sum() / denom
