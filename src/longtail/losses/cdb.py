"""Class-wise difficulty-balanced (CDB) weights and the CDB cross-entropy (Sinha, Ohashi and
Nakamura, "Class-Wise Difficulty-Balanced Loss for Solving Class-Imbalance", ACCV 2020;
"Class-Difficulty Based Methods for Long-Tailed Visual Recognition", IJCV 2022, CDB-W loss).

Official code: github.com/hitachi-rd-cv/CDB-loss, commit 82b0119e189a50beb3ae581d401dd8585739c112
(`CIFAR-LT/losses/cdb_loss.py`, `CIFAR-LT/cifar_train.py`; `ImageNet-LT/loss/CDBSoftmaxLoss.py`).
The weights come from per-class difficulties d_c = 1 - (validation accuracy of class c), which
the `cdb_ce` method (methods/cdb.py) measures after every epoch; this module only turns them
into weights and applies them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import choice
from .base import Loss

DYNAMIC_TAU = ("sigmoid", "two_sigmoid")
CDB_EPSILON = 0.01  # official: 1 - max(d) + 0.01 in the dynamic tau's denominator
REDUCTIONS = ("batch_mean", "weighted_mean")


def cdb_tau(class_difficulty, *, tau="dynamic", dynamic: str = "sigmoid") -> float:
    """The exponent tau of the CDB weights.

    A number is used as it is. 'dynamic' derives it from the difficulties d (C,), with
    b = (1 - min d) / (1 - max d + 0.01) = A_max / (A_min + 0.01) (A: class accuracy):

    * dynamic='sigmoid': tau = sigmoid(b), as `CIFAR-LT/losses/cdb_loss.py` (and
      `EGTEA/losses/cdb_loss.py`), the loss the official CIFAR-LT training runs; tau in
      (0.5, 1).
    * dynamic='two_sigmoid': tau = 2 sigmoid(b - 1), as `ImageNet-LT/loss/CDBSoftmaxLoss.py`
      and the unused `CIFAR-LT/utils.compute_weights`; tau in (0.54, 2).
    """
    if tau != "dynamic":
        return float(tau)
    d = np.asarray(class_difficulty, dtype=np.float64)
    b = (1.0 - d.min()) / (1.0 - d.max() + CDB_EPSILON)
    if dynamic == "two_sigmoid":
        return 2.0 / (1.0 + math.exp(-(b - 1.0)))
    return 1.0 / (1.0 + math.exp(-b))


def cdb_weights(class_difficulty, *, tau="dynamic", dynamic: str = "sigmoid") -> torch.Tensor:
    """CDB-W weights (IJCV Eq. for w_c; official `CDB_loss.__init__`): w_c = d_c^tau, normalised
    so that sum_c w_c = C. float32 (C,).

    A class with d_c = 0 (perfect validation accuracy) gets weight 0, as in the official code.
    Where every d_c is 0 the official code divides 0 by 0 (NaN weights); here every weight is 1.
    """
    d = np.clip(np.asarray(class_difficulty, dtype=np.float64), 0.0, 1.0)
    w = np.power(d, cdb_tau(d, tau=tau, dynamic=dynamic))
    total = w.sum()
    w = np.ones_like(w) if total <= 0 else w / total * len(w)
    return torch.tensor(w, dtype=torch.float32)


def check_tau(tau):
    """'dynamic' or a finite number >= 0 (ValueError otherwise)."""
    if tau == "dynamic":
        return tau
    ok = isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau >= 0
    if not ok:
        raise ValueError(f"tau must be 'dynamic' or a finite number >= 0, got {tau!r}")
    return float(tau)


@LOSSES.register("cdb_ce")
class CDBCrossEntropy(Loss):
    """Softmax cross-entropy with CDB class weights (CDB-W-CE; official `CDB_loss` on CIFAR-LT).

    The weights w (C,) are set from outside by `set_class_weight` (the `cdb_ce` method, after
    every epoch's validation); without weights this is plain CE. Reductions:

    * 'batch_mean' (default, official CIFAR-LT): `nn.CrossEntropyLoss(weight=w,
      reduction='none')` then `torch.mean`, i.e. (1/B) sum_i w_{y_i} l_i. The step size thus
      follows the batch's mean weight.
    * 'weighted_mean' (official ImageNet-LT, PyTorch's default): sum_i w_{y_i} l_i / sum_i w_{y_i}.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {}  # without a class weight (CDB's epoch 0) it is softmax cross-entropy

    def __init__(self, *, class_counts, reduction: str = "batch_mean"):
        super().__init__(class_counts=class_counts)
        self.reduction = choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.class_weight is None:
            return F.cross_entropy(logits, target)
        weight = self.class_weight.to(logits.dtype)
        if self.reduction == "weighted_mean":
            return F.cross_entropy(logits, target, weight=weight)
        return (F.cross_entropy(logits, target, reduction="none") * weight[target]).mean()
