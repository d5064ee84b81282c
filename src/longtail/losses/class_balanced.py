"""Class-balanced losses (Cui et al., CVPR 2019): softmax, sigmoid and sigmoid-focal variants.

Three registered names, one per variant of the official TF code
(richardaecn/class-balanced-loss, `src/cifar_main.py`, `--loss_type softmax|sigmoid|focal`):
`class_balanced` (softmax), `cb_sigmoid`, `cb_focal`. All use the effective-number
weights w_c = (1 - beta) / (1 - beta^n_c), normalised to sum C (paper: 1 / E_n, E_n =
(1 - beta^n) / (1 - beta); TF `main()`), with n clamped >= 1 (zero-count classes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss, effective_number_weights

REDUCTIONS = ("batch", "weights")


class _ClassBalancedBase(Loss):
    """Effective-number weights in the buffer `cb_weight` (C,); reduction 'batch' | 'weights'."""

    def __init__(self, *, class_counts, beta: float, reduction: str):
        super().__init__(class_counts=class_counts)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'batch' or 'weights', got {reduction!r}")
        self.beta, self.reduction = float(beta), reduction
        # n clamped >= 1: a zero-count class (never a target) would make its weight inf and
        # every normalised weight NaN; with n = 1 it just gets the largest weight
        counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        self.register_buffer("cb_weight", effective_number_weights(counts, self.beta))

    def sample_weight(self, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) w_{y_i}: the CB weight times the RW / DRW class weight when one is set."""
        w = self.cb_weight.to(dtype)
        if self.class_weight is not None:
            w = w * self.class_weight.to(dtype)
        return w[target]

    def reduce(self, per_sample: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        denom = per_sample.new_tensor(float(per_sample.numel())) if self.reduction == "batch" else w.sum()
        return per_sample.sum() / denom


@LOSSES.register("class_balanced")
class ClassBalancedSoftmax(_ClassBalancedBase):
    """Class-balanced softmax cross-entropy (Cui et al., CVPR 2019, Sec. 4, softmax CE).

    w_c = (1 - beta) / (1 - beta^n_c), normalised to sum C (effective number of samples).
    `reduction='batch'` (default) follows the official TF code
    (`tf.losses.softmax_cross_entropy` with SUM_BY_NONZERO_WEIGHTS):
    loss = (1/B) sum_i w_{y_i} CE_i. `reduction='weights'` divides by sum_i w_{y_i} instead
    (PyTorch's weighted mean). A re-weighting schedule's class weight, if also set,
    multiplies in.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {"beta": 0.0}  # every weight 1

    def __init__(self, *, class_counts, beta: float = 0.9999, reduction: str = "batch"):
        super().__init__(class_counts=class_counts, beta=beta, reduction=reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.sample_weight(target, logits.dtype)
        return self.reduce(F.cross_entropy(logits, target, reduction="none") * w, w)


@LOSSES.register("cb_sigmoid")
class ClassBalancedSigmoid(_ClassBalancedBase):
    """Class-balanced sigmoid (one-vs-all) loss (Cui et al., CVPR 2019, Sec. 4, sigmoid CE).

    Official TF code (`model_base.py`, `--loss_type sigmoid`): one-hot targets Y (B, C),
    per-element BCE, the per-sample weight w_{y_i} multiplies all C binary terms of sample
    i (negatives included), and the sum is divided by sum(Y) = B:

        loss = (1/B) sum_{i,j} w_{y_i} BCE(z_ij, Y_ij)

    `reduction='weights'` divides by sum_i w_{y_i} instead. A re-weighting schedule's class
    weight multiplies w. The official code also initialises the last-layer bias to
    -log(C - 1) for sigmoid heads; this package does not (see docs/losses.md).

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = None  # a sigmoid (one-vs-all) loss: no setting is softmax CE

    def __init__(self, *, class_counts, beta: float = 0.9999, reduction: str = "batch"):
        super().__init__(class_counts=class_counts, beta=beta, reduction=reduction)

    def elementwise(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        w = self.sample_weight(target, logits.dtype)
        per_sample = self.elementwise(logits, onehot).sum(dim=1) * w
        return self.reduce(per_sample, w)


@LOSSES.register("cb_focal")
class ClassBalancedFocal(ClassBalancedSigmoid):
    """Class-balanced sigmoid focal loss (Cui et al., CVPR 2019, Sec. 4; Lin et al., ICCV 2017).

    Official TF code (`model_base.py`, `focal_loss`, `--loss_type focal`): per element,
    modulator (1 - p_t)^gamma with p_t = sigmoid(z) for the positive and 1 - sigmoid(z) for
    negatives, computed stably as

        mod = exp(-gamma * Y * z - gamma * log(1 + exp(-z)))

    (log(1 + exp(-z)) evaluated with softplus, so very negative z does not overflow; the
    modulator is exactly 1 at gamma = 0 and is not detached), then

        loss = (1/B) sum_{i,j} w_{y_i} * mod_ij * BCE(z_ij, Y_ij)

    gamma defaults to 1.0 (argparse and the CB script); the paper searches {0.5, 1, 2}.
    gamma = 0 equals `cb_sigmoid`. Class weight and `reduction` as in `cb_sigmoid`.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = None  # a sigmoid (one-vs-all) loss: no setting is softmax CE

    def __init__(self, *, class_counts, beta: float = 0.9999, gamma: float = 1.0, reduction: str = "batch"):
        super().__init__(class_counts=class_counts, beta=beta, reduction=reduction)
        self.gamma = number("gamma", gamma, low=0)

    def elementwise(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        bce = super().elementwise(logits, onehot)
        if self.gamma == 0:
            return bce
        modulator = torch.exp(-self.gamma * onehot * logits - self.gamma * F.softplus(-logits))
        return modulator * bce


__all__ = ["ClassBalancedFocal", "ClassBalancedSigmoid", "ClassBalancedSoftmax"]
