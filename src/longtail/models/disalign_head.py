"""DisAlign's adaptive calibration head (Zhang et al., "Distribution Alignment: A Unified
Framework for Long-tail Visual Recognition", CVPR 2021, Sec. 3, "adaptive calibration function").

Read against the official code: Megvii-BaseDetection/cvpods `cvpods/layers/wrappers.py`
(`DisAlignLinear`, `DisAlignNormalizedLinear`; commit 2deea5dc659371318c8a570c644201d913a83027),
used by Megvii-BaseDetection/DisAlign (commit a2fc3500a108cb83e3942293a5675c97ab3a2c6e).
"""

from __future__ import annotations

import torch
from torch import nn


class DisAlignHead(nn.Module):
    """Calibrated logits of a frozen classifier head:

        z      = base(x)                                  (B, C)  the stage-1 logits
        sigma  = sigmoid(v^T x + b)                       (B, 1)  instance-wise confidence
        z_hat  = (1 + sigma * alpha) * z + sigma * beta   (B, C)

    with per-class magnitude `logit_scale` alpha (C,) and margin `logit_bias` beta (C,), and the
    confidence layer `confidence` = Linear(D, 1) on the same pooled features x (B, D) the base
    head sees. The calibration is part of the forward pass in every mode, so evaluation,
    prediction and export all use it.

    Official initialisation (`DisAlignLinear`): alpha = 1 (`scale_init`), beta = 0, v = 0.1
    everywhere (`confidence_init`), b PyTorch's default uniform(+-1/sqrt(D)). Note that with
    alpha = 1 the head starts at (1 + sigma) * z, not at z (same argmax); `scale_init: 0` starts
    exactly at the stage-1 logits (as the official segmentation head, which writes the same
    function as sigma * (alpha' z + beta) + (1 - sigma) z with alpha' = 1 + alpha). alpha = beta
    = 0 gives the stage-1 logits exactly, whatever sigma.

    `base` (the stage-1 linear or cosine head) is frozen here. The official cosine variant
    (`DisAlignNormalizedLinear`) feeds the confidence layer the L2-normalised feature when its
    classifier normalises features; here the confidence layer always sees the pooled feature.
    """

    def __init__(self, base: nn.Module, *, in_features: int, num_classes: int, scale_init: float = 1.0,
                 confidence_init: float = 0.1):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.confidence = nn.Linear(in_features, 1)
        nn.init.constant_(self.confidence.weight, confidence_init)
        self.logit_scale = nn.Parameter(torch.full((num_classes,), float(scale_init)))
        self.logit_bias = nn.Parameter(torch.zeros(num_classes))

    def confidence_score(self, features: torch.Tensor) -> torch.Tensor:
        """sigma(x), (B, 1)."""
        return torch.sigmoid(self.confidence(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.base(features)
        sigma = self.confidence_score(features)
        return (1 + sigma * self.logit_scale) * logits + sigma * self.logit_bias
