"""NCL loss: Nested Individual Learning + Nested Balanced Online Distillation with Hard Category Mining
(Li, Tan, Wan, Lei, Guo, "Nested Collaborative Learning for Long-Tailed Visual Recognition", CVPR 2022;
official Bazinga699/NCL, commit f64fddb3587b7439f3a8b731448a4ab3d3defe26, `lib/loss/loss.py`
`NIL_NBOD` and `NBOD`, CIFAR config `config/CIFAR/CIFAR100/cifar100_im100_NCL.yaml`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import choice, integer, number
from .base import Loss

KL_EPS = 1e-9  # official NBOD: log(softmax + 1e-9) for the distilled expert's log-probabilities


def hard_categories(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Hard Category Mining: the indices (B, min(k, C)) of the target class (first) and the k - 1
    non-target classes with the highest logits, per row. `logits` (B, C) are the official first
    expert's *raw* logits (`inputs[0]`, before the balanced shift). No gradient."""
    with torch.no_grad():
        scores = logits.detach().scatter(1, target.unsqueeze(1), float("inf"))
        return scores.topk(min(k, logits.shape[1]), dim=1).indices


def hard_category_mask(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """The 0/1 mask (B, C) of `hard_categories` (the official `mask`). k >= C selects every class."""
    top = hard_categories(logits, target, k)
    return torch.zeros_like(logits, dtype=logits.dtype).scatter(1, top, 1.0).detach()


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 classes: torch.Tensor) -> torch.Tensor:
    """CE of `logits` (B, K) at positions `target` (B,), weighted by weight[classes] (the samples'
    original classes) as PyTorch's weighted mean; the plain mean without a weight."""
    per = F.cross_entropy(logits, target, reduction="none")
    if weight is None:
        return per.mean()
    w = weight[classes]
    return (per * w).sum() / w.sum()


def nbod(logits: list[torch.Tensor], factor: float) -> torch.Tensor | float:
    """Balanced online distillation over E experts' (balanced) logits, each (B, C):

        factor / (E - 1) * sum_{i != j} KL(p_j || p_i),  KL batch mean,
        p = softmax(logits), the student's log-probabilities log(p_i + 1e-9)

    As the official `NBOD`: the target p_j is *not* detached, so each pair pulls both experts
    (mutual learning with gradients through teacher and student); temperature 1. E = 1 -> 0.
    One deviation, in the gradient only: the target's own log p_j is log_softmax(z_j), where the
    official `F.kl_div(log(p_i + 1e-9), p_j)` takes log(p_j) inside; the value is the same (0 log 0 = 0),
    but where p_j underflows to 0 (float32: a logit gap > ~104) the official gradient is NaN and ours
    is finite.
    """
    e = len(logits)
    if e < 2:
        return 0.0
    probs = [F.softmax(z, dim=1) for z in logits]
    own_logs = [F.log_softmax(z, dim=1) for z in logits]
    student_logs = [torch.log(p + KL_EPS) for p in probs]
    total = 0.0
    batch = logits[0].shape[0]
    for i in range(e):
        for j in range(e):
            if i != j:
                total = total + (probs[j] * (own_logs[j] - student_logs[i])).sum() / batch
    return factor * total / (e - 1)


@LOSSES.register("ncl")
class NCLLoss(Loss):
    """NCL's NIL + NBOD over all classes and over the mined hard classes (official `NIL_NBOD`).

    Expert logits z_e (E, B, C); balanced logits a_e = z_e + log(n + eps) (balanced softmax,
    `balanced: true`; the official `inputs[i] + log(num_class_list)`); hard mask M (B, C) of
    `hard_category_mask(z_0, y, hard_classes)`; hard logits h_e = a_e * M (official `hard_mask: zero`:
    the classes outside the hard set get logit 0 and stay in the softmax) or the k hard columns of a_e
    (`hard_mask: exclude`: the paper's softmax over the hard set only, (B, k)):

        loss = sum_e [ ce_weight CE(a_e, y) + hcm_weight CE(h_e, y) ]            (NIL)
               + nbod([a_e], distill_weight) + nbod([h_e], distill_hard_weight)  (NBOD)

    Official CIFAR values: hard_classes 30 (HCM_N), ce_weight 1 (CE_RATIO), hcm_weight 1 (HCM_RATIO),
    distill_weight 0.6 (DIVERSITY_FACTOR), distill_hard_weight 0.6 (DIVERSITY_FACTOR_HCM).
    The E experts' terms are summed, not averaged (official). The mask is mined from expert 0 only.

    Class weight (RW / DRW; not in NCL): PyTorch's weighted mean in both NIL cross-entropies; the
    distillation terms are unweighted.

    (B, C) logits are one expert: NBOD is 0, and with hcm_weight = 0 the loss is ce_weight times
    balanced softmax (`balanced_softmax` with the same eps).

    Shapes: logits (E, B, C) or (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    logit_prior = "uniform"  # balanced softmax underneath: z + log n is trained, z is the balanced posterior
    # balanced softmax underneath (and NBOD needs E >= 2): CE only when every class count is equal,
    # a property of the data, not of a parameter (tests/test_ncl.py::test_neutral_settings)
    neutral_params = None

    def __init__(self, *, class_counts, hard_classes: int = 30, ce_weight: float = 1.0, hcm_weight: float = 1.0,
                 distill_weight: float = 0.6, distill_hard_weight: float = 0.6, hard_mask: str = "zero",
                 balanced: bool = True, eps: float = 1e-6):
        super().__init__(class_counts=class_counts)
        self.hard_classes = integer("hard_classes", hard_classes, low=1)
        self.ce_weight = number("ce_weight", ce_weight, low=0)
        self.hcm_weight = number("hcm_weight", hcm_weight, low=0)
        self.distill_weight = number("distill_weight", distill_weight, low=0)
        self.distill_hard_weight = number("distill_hard_weight", distill_hard_weight, low=0)
        self.hard_mask = choice("hard_mask", hard_mask, ("zero", "exclude"))
        if not isinstance(balanced, bool):
            raise ValueError(f"balanced must be true or false, got {balanced!r}")
        self.balanced = balanced
        self.eps = number("eps", eps, low=0)
        n = np.asarray(class_counts, dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_n = np.log(n + self.eps) if balanced else np.zeros_like(n)
        self.register_buffer("log_prior", torch.tensor(log_n, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        if logits.dim() != 3 or logits.shape[1] != target.shape[0]:
            raise ValueError(f"ncl loss needs expert logits (E, B, C) or (B, C) for {target.shape[0]} targets, "
                             f"got {tuple(logits.shape)}")
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        top = hard_categories(logits[0], target, self.hard_classes)
        balanced = [z + self.log_prior.to(logits.dtype) for z in logits]
        if self.hard_mask == "zero":  # official: (B, C), logit 0 outside the hard set
            mask = torch.zeros_like(logits[0]).scatter(1, top, 1.0)
            hard, hard_target = [a * mask for a in balanced], target
        else:  # the paper's reading: the softmax over the hard set only, (B, k), the target at 0
            hard, hard_target = [a.gather(1, top) for a in balanced], torch.zeros_like(target)
        total = logits.new_zeros(())
        for a, h in zip(balanced, hard):
            if self.ce_weight:
                total = total + self.ce_weight * F.cross_entropy(a, target, weight=weight)
            if self.hcm_weight:
                total = total + self.hcm_weight * _weighted_ce(h, hard_target, weight, target)
        if self.distill_weight:
            total = total + nbod(balanced, self.distill_weight)
        if self.distill_hard_weight:
            total = total + nbod(hard, self.distill_hard_weight)
        return total
