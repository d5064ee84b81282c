"""Class-balanced loss, 'softmax' variant of the PyTorch port used by weight balancing.

Weight balancing (Alshammari et al., CVPR 2022) trains its stage-2 classifier with "the
class-balanced loss" (Cui et al., CVPR 2019). Its official code (ShadeAlsha/LTR-weight-balancing
@ e89f292, `utils/class_balanced_loss.py`, imported from vandit15/Class-balanced-loss-pytorch,
called as `CB_loss(..., "softmax", beta=0.9999, gamma=2.0)` in demo2) does not compute the
weighted softmax cross-entropy of Cui et al.'s TF code (this package's `class_balanced`): its
'softmax' type is a *binary* cross-entropy on the softmax probabilities, one term per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from .class_balanced import _ClassBalancedBase


@LOSSES.register("cb_softmax_bce")
class ClassBalancedSoftmaxBCE(_ClassBalancedBase):
    """Class-balanced BCE on softmax probabilities (weight balancing's stage-2 loss, official code).

    With p = softmax(z) (B, C), one-hot targets Y (B, C) and the effective-number weights
    w_c = (1 - beta) / (1 - beta^n_c) normalised to sum C (Cui et al. 2019, Eq. 3):

        loss = 1 / (B C) * sum_{i,j} w_{y_i} * BCE(p_ij, Y_ij),
        BCE(p, y) = -(y log p + (1 - y) log(1 - p)),

    the per-sample weight w_{y_i} repeated over all C terms of sample i and the mean taken over
    all B*C elements, as `F.binary_cross_entropy(softmax(z), Y, weight=W)` in the official code
    (whose log is clamped at -100, so the value stays finite for saturated probabilities). The
    'focal' gamma the official call passes is unused by this type. A re-weighting schedule's
    class weight, if also set, multiplies w. Computed in float32 (float64 kept) outside autocast:
    torch refuses binary_cross_entropy under CUDA autocast.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = None  # a binary (per-class) loss on probabilities: no setting is softmax CE

    def __init__(self, *, class_counts, beta: float = 0.9999):
        super().__init__(class_counts=class_counts, beta=beta, reduction="batch")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(logits.device.type, enabled=False):
            z = logits.to(dtype)
            prob = z.softmax(dim=1)
            onehot = F.one_hot(target, z.shape[1]).to(dtype)
            w = self.sample_weight(target, dtype)
            bce = F.binary_cross_entropy(prob, onehot, reduction="none")  # (B, C), log clamped at -100
            return (bce * w.unsqueeze(1)).mean()


__all__ = ["ClassBalancedSoftmaxBCE"]
