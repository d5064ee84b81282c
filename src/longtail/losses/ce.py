"""Cross-entropy (the class-balanced losses live in class_balanced.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from .base import Loss


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Softmax cross-entropy, optionally class-weighted.

    With a class weight w (set by RW / DRW), PyTorch's weighted mean is used, as in
    LDAM-DRW: sum_i w_{y_i} l_i / sum_i w_{y_i}.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = {}  # it is softmax cross-entropy

    def __init__(self, *, class_counts):
        super().__init__(class_counts=class_counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=weight)
