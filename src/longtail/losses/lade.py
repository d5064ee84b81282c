"""LADE loss (Hong et al., "Disentangling Label Distribution for Long-tailed Visual
Recognition", CVPR 2021; official code github.com/hyperconnect/LADE, commit 5db5d13).

Two terms, as the official trainer sums them (`run_networks.py::batch_loss`):

* LADE-CE, the official `loss/PriorCELoss.py` ("PerformanceLoss", weight 1): softmax cross-
  entropy of the logits shifted by the log training prior, CE(f(x) + log(pi_s + 1e-9), y). The raw
  f(x) is then calibrated to a uniform label distribution: its softmax estimates p_u(y | x).
* LADER, the official `loss/LADELoss.py` ("RouteWeightLoss", weight alpha): a per-class
  Donsker-Varadhan (MINE) bound on log p_s(x | y) / p_s(x), regularised as ReMINE by lambda times
  the square of its log-partition term, weighted by the training prior and negated.

At test time the official code (`run_networks.py::eval`, `notebooks/*-shift-calib.ipynb`) adds
log p_t of the test split to the raw logits: for a uniform test set the raw logits, for a stated
test prior p_t, f(x) + log p_t. The class attribute `logit_prior = "uniform"` tells
`longtail predict` / `longtail eval --logit-adjust-tau` this (`logit_adjust.source_prior`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss

PRIOR_EPS = 1e-9  # official: torch.log(self.prior + 1e-9), torch.log(self.balanced_prior + 1e-9)
COUNT_EPS = 1e-8  # official: torch.sum(x_p, -1) / (num_samples_per_cls + 1e-8)


@LOSSES.register("lade")
class LADELoss(Loss):
    """LADE = LADE-CE + alpha * LADER (Hong et al., CVPR 2021, Sec. 3; official `PriorCELoss` +
    `LADELoss`).

    With pi_s = n / sum(n) the training prior (C,), B the batch size, n_c^B the number of batch
    samples of class c, and z = logits (B, C):

        LADE-CE = CE(z + log(pi_s + 1e-9), y)                         (PriorCELoss)
        T1_c    = sum_{i: y_i = c} z_ic / (n_c^B + 1e-8)              (mean over class c's samples)
        T2_c    = logsumexp_i (z_ic - log(pi_s,c + 1e-9) + log(1/C + 1e-9)) - log B
                                                                      (over ALL B samples)
        LADER   = - sum_c pi_s,c * (T1_c - T2_c - lambda * T2_c^2)
        loss    = LADE-CE + alpha * LADER

    T1_c - T2_c is the Donsker-Varadhan lower bound of KL(p(x | c) || p(x)) with critic
    z_c - log pi_s,c + log(1/C); lambda * T2_c^2 is the ReMINE regulariser that pulls the
    log-partition T2_c toward 0, i.e. pulls z_c toward the optimal critic log p(x | c) / p(x) =
    log p_u(c | x) - log(1/C), so the raw logits are calibrated to the uniform prior.

    Quirks of the official code, all kept (reading chosen: the official code):

    * The class weight of the LADER sum is pi_s (the training prior, `cls_weight`), not uniform.
    * A class absent from the batch has T1_c = 0 but still contributes -pi_s,c * (-T2_c -
      lambda T2_c^2): the bound is not masked to the classes present.
    * T2_c runs over the whole batch (the official single-process DataParallel batch); under
      torchrun each rank computes it over its own share, as every loss here does.
    * The official trainer applies alpha as the criterion weight; here it is a parameter of this
      one loss. alpha = 0 is LADE-CE alone (= PriorCELoss, = balanced softmax up to eps).

    Class weight (RW / DRW; not in LADE): PyTorch's weighted mean on the LADE-CE term only, as
    `ce`; the LADER term keeps its pi_s weights.

    Defaults are the official README command for CIFAR-100-LT, ratio 100 (`--alpha 0.1
    --remine_lambda 0.01`); the official code has no CIFAR-10 setting. Prediction: the raw z
    (uniform test prior); for a test prior p_t, z + log p_t (`logit_prior = "uniform"`).
    Float16 / bfloat16 logits are computed in float32.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    logit_prior = "uniform"
    # No parameter setting gives F.cross_entropy: with alpha = 0 this is CE(z + log pi_s), which is
    # CE only when every class count is equal (a property of the data; tests/test_lade.py).
    neutral_params = None

    def __init__(self, *, class_counts, alpha: float = 0.1, remine_lambda: float = 0.01):
        super().__init__(class_counts=class_counts)
        self.alpha = number("alpha", alpha, low=0)
        self.remine_lambda = number("remine_lambda", remine_lambda, low=0)
        n = np.asarray(class_counts, dtype=np.float64)
        if n.ndim != 1 or n.size == 0 or (n < 0).any() or n.sum() <= 0:
            raise ValueError("class_counts must be C >= 1 non-negative counts, not all zero")
        prior = n / n.sum()
        self.register_buffer("prior", torch.tensor(prior, dtype=torch.float32))  # LADER class weights
        self.register_buffer("log_prior", torch.tensor(np.log(prior + PRIOR_EPS), dtype=torch.float32))
        self.log_uniform = math.log(1.0 / n.size + PRIOR_EPS)

    def lader(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The LADER term (scalar, before alpha): - sum_c pi_c (T1_c - T2_c - lambda T2_c^2)."""
        B, C = logits.shape
        onehot = F.one_hot(target, C).to(logits.dtype)  # (B, C)
        per_class = onehot.sum(0)  # (C,) n_c^B
        first = (onehot * logits).sum(0) / (per_class + COUNT_EPS)  # (C,)
        critic = logits - self.log_prior.to(logits.dtype) + self.log_uniform  # (B, C)
        second = torch.logsumexp(critic, dim=0) - math.log(B)  # (C,)
        bound = first - second - self.remine_lambda * second.square()
        weight = self.prior.to(logits.dtype, copy=True)  # a copy: the graph must not hold the buffer itself
        return -(weight * bound).sum()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        loss = F.cross_entropy(logits + self.log_prior.to(logits.dtype), target, weight=weight)
        if self.alpha > 0:
            loss = loss + self.alpha * self.lader(logits, target)
        return loss
