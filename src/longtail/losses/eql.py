"""Softmax equalization loss (Tan et al., "Equalization Loss for Long-Tailed Object
Recognition", CVPR 2020)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import integer, number
from .base import Loss


@LOSSES.register("softmax_eql")
class SoftmaxEQL(Loss):
    """Softmax equalization loss for classification (Tan et al., CVPR 2020, softmax EQL).

    The official code (eql.detectron2) has only the sigmoid, detection version; this
    follows the paper's softmax form with BagofTricks-LT's classification reading
    (`lib/loss/loss_impl/equalization_loss.py`, defaults GAMMA 0.9, LAMBDA 0.005):

        f_k = n_k / sum n;  T_k = 1[f_k < lambda_]                       (rare classes)
        beta_ik ~ Bernoulli(gamma), independently per (sample, class)
        w_ik = 1 - beta_ik T_k (1 - Y_ik)                                  (target kept)
        loss_i = -z_{i,y_i} + log sum_k w_ik exp(z_ik)

    i.e. each rare negative class is dropped from sample i's softmax denominator with
    probability gamma. Computed as logsumexp(z + log w) with log w = -inf for dropped
    terms (BagofTricks' exp/sum/log has no max-subtraction and overflows).

    Randomness: only from `self.generator`, a CPU torch.Generator seeded with `seed`; the
    draws are made on the CPU and moved to the logits' device, so they do not depend on
    the device and never touch the global RNG. The generator state is part of the loss
    state_dict (`_extra_state`), so a resumed run draws what an uninterrupted one would.
    Every forward call draws (training or not).

    gamma = 0 or lambda_ = 0 is plain CE. `lambda_` is spelled with an underscore
    because `lambda` is a Python keyword.

    Class weight (RW / DRW; not in the reference code): PyTorch's weighted mean
    sum_i w_{y_i} l_i / sum_i w_{y_i}, as `ce`.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    rebalancing = True
    neutral_params = {"gamma": 0.0}  # no negative logit is dropped

    def __init__(self, *, class_counts, gamma: float = 0.9, lambda_: float = 0.005, seed: int = 0):
        super().__init__(class_counts=class_counts)
        self.gamma = number("gamma", gamma, low=0, high=1)
        self.lambda_ = number("lambda_", lambda_, low=0)
        self.seed = integer("seed", seed, low=0)
        n = np.asarray(class_counts, dtype=np.float64)
        if n.sum() <= 0:
            raise ValueError("softmax_eql needs class_counts with a positive total")
        self.register_buffer("rare", torch.tensor(n / n.sum() < self.lambda_))
        self.generator = torch.Generator().manual_seed(self.seed)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])

    def keep_mask(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(B, C) bool: False where a rare negative class is dropped for that sample."""
        draw = torch.rand((target.shape[0], num_classes), generator=self.generator) < self.gamma
        drop = draw.to(target.device) & self.rare[None, :]
        return ~drop | F.one_hot(target, num_classes).bool()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = self.keep_mask(target, logits.shape[1])
        log_w = torch.zeros_like(logits).masked_fill(~keep, float("-inf"))
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        # CE of (z + log w): logsumexp over kept terms minus the (kept) target logit
        return F.cross_entropy(logits + log_w, target, weight=weight)
