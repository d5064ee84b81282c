"""Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
Recognition", NeurIPS 2020)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(Loss):
    """Balanced softmax cross-entropy (Ren et al., NeurIPS 2020, Sec. 3, Balanced Softmax).

    As BALMS's `balanced_softmax_loss`: the log of the raw class counts is added to every
    logit during training only, then plain CE:

        loss = mean_i CE(z_i + log(n + eps), y_i)

    Raw counts rather than pi = n / sum n: this shifts all logits by one constant, so the
    value is the same. `eps` (default 1e-6, as DLSA's copy; the BALMS code has none) keeps a
    zero-count class finite: its adjusted logit is z + log(1e-6) = z - 13.8, so it barely
    takes part, and samples of other classes get a finite loss and gradient. For n >= 1
    the shift differs from log n by less than 1e-6. `eps = 0` is the exact BALMS code
    (a zero-count class then gets -inf, which is still finite for the other classes'
    samples, but infinite for a sample labelled with it).

    Class weight (RW / DRW; not in BALMS): PyTorch's weighted mean
    sum_i w_{y_i} l_i / sum_i w_{y_i}, as `ce`.

    Prediction uses plain z. With equal counts this is plain CE.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    logit_prior = "uniform"  # z + log n trains z toward the balanced posterior: a stated prior p_t adds log p_t
    # CE exactly when every class count is equal: a property of the data, not of a parameter
    # (tests/test_losses.py::test_more_neutral_settings)
    neutral_params = None

    def __init__(self, *, class_counts, eps: float = 1e-6):
        super().__init__(class_counts=class_counts)
        self.eps = number("eps", eps, low=0)
        n = np.asarray(class_counts, dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_n = np.log(n + self.eps)
        self.register_buffer("log_prior", torch.tensor(log_n, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target, weight=weight)
