"""CE + lambda * an auxiliary loss on the pooled features: range loss, lifted structured loss.

`feature_loss` (one stage): each step runs `forward(images) -> (features (B, D), logits (B, C))`
once and minimises

    L = L_cls(logits, y) + weight * L_feat(features, y)

with L_cls the configured loss (`loss.name`, with RW / DRW as usual) and L_feat one of
losses/feature.py's FEATURE_LOSSES, chosen by `feature_loss` ('range' | 'lifted') and built with
`feature_params`. weight 0 is exactly the configured loss. The feature loss is computed on each
process's own batch (as the single-GPU official code sees one batch); it has no state. The
prediction is the classifier's (the head's logits), as in the papers.

Neither paper fixes the weight for CIFAR: the rows the seed papers quote (seed 001, SWRM,
Tables 3 / 4: ImageNet-LT / Places-LT) are copied from OLTR (Liu et al. 2019), which released no
code for them. Default weight 1 (the official lifted prototxt's loss_weight; range loss's own
alpha / beta carry its scale).
"""

from __future__ import annotations

import torch

from ..losses.feature import build_feature_loss
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing
from ..losses._checks import number


@METHODS.register("feature_loss")
class FeatureLoss(Method):
    """L_cls(logits) + weight * L_feat(features) in one forward pass per step."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "feature losses (range, lifted): the batch's classes and pairs found with torch.unique / boolean masks (losses/feature.py)",
    )

    def __init__(self, *, cfg, data, feature_loss: str = "range", weight: float = 1.0,
                 feature_params: dict | None = None):
        super().__init__(cfg=cfg, data=data)
        self.weight = number("weight", weight, low=0)
        self.feature_loss_name = feature_loss
        self.feature = build_feature_loss(feature_loss, feature_params)
        refuse_batch_mixing(cfg, "feature_loss", "a feature loss needs one label per sample")

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        features, logits = forward(images)
        total = loss(logits, target)
        if self.weight:
            total = total + self.weight * self.feature(features.float(), target)
        return StepResult(total, logits, target)

    def plain_ce_epochs(self) -> float:
        """With weight 0 this is the standard method with the configured loss."""
        c = self.cfg
        if self.weight or c.loss.name != "ce" or c.loss.params:
            return 0
        return self._unweighted_epochs()
