"""Seesaw loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist

from ..registry import LOSSES
from ._checks import number
from .base import Loss


@LOSSES.register("seesaw")
class SeesawLoss(Loss):
    """Seesaw loss for classification (Wang et al., CVPR 2021), mmdetection's reading.

    Read against mmdetection's `mmdet/models/losses/seesaw_loss.py` (`seesaw_ce_loss`),
    keeping only its C-way class part (mmdet's extra 2-way objectness logits are for
    detection). For sample i with label y = i-class and every other class j:

    * online counts: before the loss, `cum_samples[c] += #(target == c)` in this batch
      (buffer, int64, starts at zero; the dataset counts are not used);
      N = cum_samples clamped >= 1.
    * mitigation M_ij = (N_j / N_i)^p if N_j < N_i else 1;
    * compensation C_ij = (sigma_j / max(sigma_i, eps))^q if that ratio > 1 else 1, with
      sigma = softmax(z.detach()) of the raw logits (mmdet clamps the divisor at eps);
    * seesaw factor S_ij = M_ij C_ij; z'_ij = z_ij + log S_ij for j != y_i and
      z'_{i,y_i} = z_{i,y_i} (S_ij multiplies the negative exponentials of the softmax
      denominator);
    * loss = (1/B) sum_i w_i CE(z'_i, y_i).

    The factors carry no gradient (counts are data, sigma is detached), as in mmdet.
    p = q = 0 is plain CE. Defaults p = 0.8, q = 2.0, eps = 1e-2 (mmdet SeesawLoss).

    Class weight (RW / DRW): enters as mmdet's per-sample `label_weights` w_i = w_{y_i},
    reduced with mmdet's 'mean', i.e. sum_i w_i l_i / B (not / sum w).

    State: `cum_samples` is a persistent buffer (checkpointed with the loss state_dict).
    The counts are updated in every forward call (training or not), as in mmdet; every
    call is a training step. For multi-process (DDP) training call `sync_statistics()`
    on every rank at the same point of each step (e.g. after backward) and before saving
    a checkpoint: it all-reduces the count increments since the last sync so that every
    rank holds the global counts. Between syncs a rank's counts are the global counts at
    the last sync plus its own increments. In one process it only clears the increments.

    Shapes: logits (B, C), target (B,) int64 -> scalar. `class_counts` only sets C.
    """

    rebalancing = True
    neutral_params = {"p": 0.0, "q": 0.0}  # both factors 1

    def __init__(self, *, class_counts, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        super().__init__(class_counts=class_counts)
        self.p = number("p", p, low=0)
        self.q = number("q", q, low=0)
        self.eps = number("eps", eps, low=0, low_open=True)
        self.register_buffer("cum_samples", torch.zeros(self.num_classes, dtype=torch.int64))
        # increments since the last sync_statistics(); not checkpointed
        self.register_buffer("_pending", torch.zeros(self.num_classes, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def accumulate(self, target: torch.Tensor) -> None:
        """Add the batch's label counts to `cum_samples` (called by forward before the loss)."""
        # index_add_ of ones rather than bincount (whose CUDA kernel reads the labels' maximum on the host)
        inc = torch.zeros_like(self.cum_samples).index_add_(0, target.to(self.cum_samples.device),
                                                             torch.ones_like(target, dtype=self.cum_samples.dtype))
        self.cum_samples += inc
        self._pending += inc

    @torch.no_grad()
    def sync_statistics(self) -> None:
        """DDP reduction point: all-reduce (sum) the count increments since the last call.

        A collective when torch.distributed is initialised with more than one process:
        every rank must call it at the same point. A no-op (beyond clearing the local
        increment record) otherwise.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = self._pending.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            self.cum_samples += total - self._pending  # the other ranks' increments
        self._pending.zero_()

    def seesaw_factors(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, C) seesaw factors S_ij = M_ij C_ij from the counts and the detached logits."""
        factors = logits.new_ones(logits.shape)
        if self.p > 0:
            n = self.cum_samples.to(logits.device, logits.dtype).clamp(min=1)
            ratio = n[None, :] / n[:, None]  # [i, j] = N_j / N_i
            mitigation = torch.where(ratio < 1, ratio.pow(self.p), torch.ones_like(ratio))
            factors = factors * mitigation[target]
        if self.q > 0:
            sigma = F.softmax(logits.detach(), dim=1)
            self_sigma = sigma.gather(1, target[:, None]).clamp(min=self.eps)
            ratio = sigma / self_sigma
            factors = factors * torch.where(ratio > 1, ratio.pow(self.q), torch.ones_like(ratio))
        return factors

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.accumulate(target)
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        adjusted = logits + self.seesaw_factors(logits, target).log() * (1 - onehot)
        per_sample = F.cross_entropy(adjusted, target, reduction="none")
        if self.class_weight is not None:
            per_sample = per_sample * self.class_weight.to(logits.dtype)[target]
        return per_sample.mean()
