"""Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss

PRIOR_EPS = 1e-12  # google-research logit_adjustment/utils.py: log(pi^tau + 1e-12)


@LOSSES.register("logit_adjustment")
class LogitAdjustedLoss(Loss):
    """Logit-adjusted softmax cross-entropy (Menon et al., ICLR 2021, the logit-adjusted loss).

    As google-research `logit_adjustment` (`--mode loss`): pi = n / sum n (the empirical
    train prior), and during training only

        loss = mean_i CE(z_i + log(pi^tau + 1e-12), y_i)

    The 1e-12 is added after raising to tau (official), so a zero-count class stays
    finite. tau = 0 is plain CE (the shift log(1 + 1e-12) is the same for all classes).
    Prediction uses plain z. (The post-hoc variant, argmax(z - tau log pi), is not a loss.)

    Class weight (RW / DRW; not in the official code): PyTorch's weighted mean
    sum_i w_{y_i} l_i / sum_i w_{y_i}, as `ce`.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {"tau": 0.0}

    @classmethod
    def calibrated_prior(cls, class_counts, params: dict) -> np.ndarray:
        """z + tau log pi trains z toward pi^(1 - tau) (normalised): uniform at tau = 1, the
        training prior at tau = 0."""
        n = np.asarray(class_counts, dtype=np.float64)
        p = np.power(n / n.sum(), 1.0 - float(params.get("tau", 1.0)))
        return p / p.sum()

    def __init__(self, *, class_counts, tau: float = 1.0):
        super().__init__(class_counts=class_counts)
        self.tau = number("tau", tau, low=0)
        n = np.asarray(class_counts, dtype=np.float64)
        if n.sum() <= 0:
            raise ValueError("logit_adjustment needs class_counts with a positive total")
        adjustment = np.log(np.power(n / n.sum(), self.tau) + PRIOR_EPS)
        self.register_buffer("adjustment", torch.tensor(adjustment, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), target, weight=weight)
