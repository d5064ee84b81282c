"""Label-aware smoothing of MiSLAS (Zhong et al., "Improving Calibration for Long-Tailed
Recognition", CVPR 2021)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import choice, number
from .base import Loss

SHAPES = ("concave", "linear", "convex", "exp")


def label_aware_epsilons(class_counts, smooth_head: float, smooth_tail: float, shape: str,
                         power: float | None) -> np.ndarray:
    """eps_c per class (MiSLAS eps_y = f(N_y), `methods.py`): r = (n_c - N_K) / (N_1 - N_K) and

    concave: eps_K + (eps_1 - eps_K) sin(pi r / 2)
    linear:  eps_K + (eps_1 - eps_K) r
    convex:  eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi r / 2)
    exp:     eps_K + (eps_1 - eps_K) r^power

    N_1 = max n, N_K = min n. When all counts are equal (N_1 == N_K, where MiSLAS divides
    by zero) every class is a head class: r = 1, eps_c = smooth_head for all shapes.
    """
    n = np.asarray(class_counts, dtype=np.float64)
    n1, nk = n.max(), n.min()
    r = np.ones_like(n) if n1 == nk else (n - nk) / (n1 - nk)
    head, tail = smooth_head, smooth_tail
    if shape == "concave":
        return tail + (head - tail) * np.sin(r * math.pi / 2)
    if shape == "linear":
        return tail + (head - tail) * r
    if shape == "convex":
        return head + (head - tail) * np.sin(1.5 * math.pi + r * math.pi / 2)
    return tail + (head - tail) * np.power(r, power)


@LOSSES.register("label_aware_smoothing")
class LabelAwareSmoothing(Loss):
    """Label-aware smoothing cross-entropy (MiSLAS, Zhong et al., CVPR 2021).

    Per-class smoothing eps_c from the class counts (see `label_aware_epsilons`; head
    classes get eps_1 = smooth_head, the rarest eps_K = smooth_tail), then

        l_i = (1 - eps_{y_i}) (-log p_{i,y_i}) + eps_{y_i} (1/C) sum_j (-log p_ij)
        loss = mean_i l_i

    The uniform part includes the true class (as MiSLAS's code). Defaults smooth_head 0.3,
    smooth_tail 0.0, shape concave are MiSLAS's CIFAR-10-LT (ratio 100) setting; `power`
    is required for shape 'exp' (MiSLAS leaves eps undefined without it). smooth_head =
    smooth_tail = 0 is plain CE. All counts equal: every class uses smooth_head (MiSLAS
    divides by zero there). Buffer `smooth` (C,) holds eps_c.

    Class weight (RW / DRW; MiSLAS has none): PyTorch's weighted mean
    sum_i w_{y_i} l_i / sum_i w_{y_i}, as `ce`.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = {"smooth_head": 0.0, "smooth_tail": 0.0}

    def __init__(self, *, class_counts, smooth_head: float = 0.3, smooth_tail: float = 0.0,
                 shape: str = "concave", power: float | None = None):
        super().__init__(class_counts=class_counts)
        self.smooth_head = number("smooth_head", smooth_head, low=0, high=1)
        self.smooth_tail = number("smooth_tail", smooth_tail, low=0, high=1)
        self.shape = choice("shape", shape, SHAPES)
        if shape == "exp":
            if power is None:
                raise ValueError("power must be a number > 0 when shape is 'exp', got None")
            power = number("power", power, low=0, low_open=True)
        elif power is not None:
            raise ValueError(f"power is only used with shape 'exp' (shape is {shape!r}); leave it unset")
        self.power = power
        eps = label_aware_epsilons(class_counts, self.smooth_head, self.smooth_tail, self.shape, self.power)
        self.register_buffer("smooth", torch.tensor(eps, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        nll = -log_p.gather(1, target[:, None]).squeeze(1)
        uniform = -log_p.mean(dim=1)
        eps = self.smooth.to(logits.dtype)[target]
        per_sample = (1 - eps) * nll + eps * uniform
        if self.class_weight is None:
            return per_sample.mean()
        w = self.class_weight.to(logits.dtype)[target]
        return (per_sample * w).sum() / w.sum()
