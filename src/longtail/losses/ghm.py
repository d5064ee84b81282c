"""GHM-C, the gradient harmonizing classification loss (Li et al., "Gradient Harmonized
Single-stage Detector", AAAI 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dist import all_reduce_sum, context

from ..registry import LOSSES
from ._checks import integer, number
from .base import Loss


@LOSSES.register("ghm_c")
class GHMCLoss(Loss):
    """Gradient harmonizing classification loss GHM-C (Li et al., AAAI 2019, sigmoid BCE).

    mmdetection semantics (`mmdet/models/losses/ghm_loss.py`, `GHMC`; sigmoid only):
    one-hot targets Y (B, C), per element

        g = |sigmoid(z).detach() - Y|                            (gradient norm)
        edges e_k = k / bins, k = 0..bins, last edge + 1e-6; bin k holds e_k <= g < e_{k+1}
        tot = number of valid elements = B * C (every element is valid here)
        r_k = #elements in bin k (this batch)
        momentum 0:  weight = tot / r_k
        momentum mu: acc_k <- mu acc_k + (1 - mu) r_k;  weight = tot / acc_k
        weights /= n, n = number of non-empty bins
        loss = sum_ij weight_ij * BCE(z_ij, Y_ij) / tot

    Empty bins are skipped: their acc_k is not decayed and they do not count in n. acc
    starts at 0 with no bias correction (mmdet), so the first steps' weights are inflated
    by up to 1 / (1 - mu). The weights carry no gradient. Defaults bins 30, momentum 0.75
    are the paper's RetinaNet config (mmdet's class defaults are 10 and 0).

    Class weight (RW / DRW; mmdet's GHM-C has none, its label_weight only marks valid
    elements): as `cb_sigmoid`, w_{y_i} multiplies all C terms of sample i; tot is
    unchanged (a zero weight does not make elements invalid).

    State: `acc_sum` (bins,) is a persistent buffer (checkpointed with the loss), updated
    in every forward call (training or not), as in mmdet. In multi-process training the
    bin counts are summed over ranks before the update (mmdet keeps one acc_sum per rank),
    so all ranks hold the same acc_sum and the loss equals the single-process one.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = None  # a sigmoid (BCE) loss: no setting is softmax CE

    def __init__(self, *, class_counts, bins: int = 30, momentum: float = 0.75):
        super().__init__(class_counts=class_counts)
        self.bins = integer("bins", bins, low=1)
        self.momentum = number("momentum", momentum, low=0, high=1, high_open=True)
        edges = torch.arange(self.bins + 1, dtype=torch.float32) / self.bins
        edges[-1] += 1e-6
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("acc_sum", torch.zeros(self.bins, dtype=torch.float32))

    def element_weights(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """((B, C) harmonizing weights, tot as a 0-dim tensor); updates acc_sum when momentum > 0.
        Sync-free: nothing is read on the host (issue 21)."""
        with torch.no_grad():
            g = (torch.sigmoid(logits.detach()) - onehot).abs()
            # bucketize(right=True) - 1: the k with edges[k] <= g < edges[k + 1], exactly
            # the comparisons of the reference loop
            idx = torch.bucketize(g, self.edges.to(g.dtype), right=True) - 1
            valid = (idx >= 0) & (idx < self.bins)
            idx = idx.clamp(0, self.bins - 1)
            # distributed: bin counts and the element count are summed over ranks, so every
            # rank weights with the global-batch histogram as one process would
            # counted with scatter_add_ over a 0/1 mask, never read on the host: no device-to-host sync
            # (bincount / boolean indexing / float() would sync on a GPU; the counts are integers, exact)
            counts = torch.zeros(self.bins, dtype=g.dtype, device=g.device)
            counts.scatter_add_(0, idx.reshape(-1), valid.reshape(-1).to(g.dtype))
            packed = all_reduce_sum(torch.cat([counts, valid.sum().reshape(1).to(g.dtype)]))
            num, tot = packed[:-1], packed[-1].clamp(min=1.0)
            nonempty = num > 0
            if self.momentum > 0:
                acc = self.acc_sum.to(g.dtype)
                acc = torch.where(nonempty, self.momentum * acc + (1 - self.momentum) * num, acc)
                self.acc_sum.copy_(acc.to(self.acc_sum.dtype))
                denom = acc
            else:
                denom = num
            # reciprocal() * tot: what `float / tensor` computes (Tensor.__rtruediv__), so the weights are bitwise those of before
            per_bin = torch.where(nonempty, denom.clamp(min=1e-12).reciprocal() * tot, torch.zeros_like(denom))
            per_bin = per_bin / nonempty.sum().clamp(min=1).to(g.dtype)  # n non-empty bins (no bin: all zeros)
            weights = per_bin[idx] * valid.to(g.dtype)
        return weights, tot

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        weights, tot = self.element_weights(logits, onehot)
        if self.class_weight is not None:
            weights = weights * self.class_weight.to(logits.dtype)[target][:, None]
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        # each rank holds 1/W of the global batch and DDP averages gradients over W ranks
        return (bce * weights).sum() / (tot / context().world_size)
