"""Classifier heads: (B, D) pooled features -> (B, C) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import HEADS


@HEADS.register("linear")
def linear_head(*, in_features: int, num_classes: int) -> nn.Module:
    """Linear layer with bias (the classifier of every CE baseline)."""
    return nn.Linear(in_features, num_classes)


@HEADS.register("cosine")
class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW (`NormedLinear`): logits = normalize(x) @ normalize(W).

    The weight is stored as (in_features, num_classes), as in the official code, so its
    checkpoints load; initialised uniform(-1, 1) and renormalised to unit-norm columns.
    Outputs are pure cosines in [-1, 1], no bias, no scale (LDAM's s multiplies in the loss).
    """

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=0)


def build_head(name: str, *, in_features: int, num_classes: int) -> nn.Module:
    return HEADS.build(name, in_features=in_features, num_classes=num_classes)
