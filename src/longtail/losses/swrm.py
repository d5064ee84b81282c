"""SWRM loss: similarity window reweighting and margins (seed 001, "SWRM: Similarity Window
Reweighting and Margins for Long-Tailed Recognition", Eq. 2-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..similarity.windows import EDGES, weights_and_margins
from ..dist import all_reduce_sum, context
from ._checks import choice, integer, number
from .base import Loss

REDUCTIONS = ("weights", "batch")


def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of the learnable vector: the mean over processes, as DDP does for the
    model's parameters (the vector lives outside the DDP-wrapped module)."""
    ctx = context()
    if not ctx.enabled:
        return grad
    return all_reduce_sum(grad.clone()) / ctx.world_size


def swrm_loss(logits: torch.Tensor, target: torch.Tensor, *, weights: torch.Tensor, margins: torch.Tensor,
              class_weight: torch.Tensor | None = None, reduction: str = "weights") -> torch.Tensor:
    """Eq. 4 over a batch: CE of z + m_y e_y (margin added to the target logit), sample i
    weighted by t_i = weights[y_i] * class_weight[y_i], reduced by sum t_i (reduction
    'weights') or by B ('batch'). logits (B, C), target (B,), weights / margins (C,)."""
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    per_sample = F.cross_entropy(logits + onehot * margins[target][:, None], target, reduction="none")
    t = weights[target]
    if class_weight is not None:
        t = t * class_weight[target]
    total = (t * per_sample).sum()
    return total / t.sum() if reduction == "weights" else total / len(target)


@LOSSES.register("swrm")
class SWRMLoss(Loss):
    """Similarity window reweighting and margins (SWRM, seed 001, Eq. 4) with SWR weights
    (Eq. 2) and SWM margins (Eq. 3).

    Per sample, with the margin *added* to the target logit as Eq. 4 is written:

        l_i = -log( e^{z_iy + m_y} / (e^{z_iy + m_y} + sum_{j != y} e^{z_ij}) ),  y = y_i
        loss = sum_i t_i l_i / sum_i t_i     (reduction 'weights', default)
             = sum_i t_i l_i / B             (reduction 'batch')
        t_i = w_{y_i} * class_weight_{y_i}   (class_weight: RW / DRW, 1 when unset)

    The paper gives only the per-sample loss; the default batch normalisation is PyTorch's
    weighted mean, as LDAM-DRW's weighted CE (SWRM's two-stage recipe follows LDAM-DRW).

    Weights w (C,) and margins m (C,) come from `similarity.windows` (window order, Eq. 2,
    Eq. 3): `set_similarity(projection, similarity=None)` computes and stores them as
    persistent buffers (`swr_weight`, `swm_margin`, so they travel in checkpoints). Until
    then w = 1 and m = 0 and the loss is plain cross-entropy: stage 1 of the two-stage
    recipe (method `swrm`). Given `projection` (C numbers, optionally `similarity`, C x C in
    (0, 1]) in the loss params, the loss is SWRM from the first step, with any method.

    DySWRM: `add_learnable_vector(init)` adds the learnable similarity vector `vector`
    (C,) as an nn.Parameter of this module; while `learning` is True (method `dyswrm` sets
    it from its switch epoch on) every forward call recomputes the order, windows, w and m
    from it. The windows (an argsort) and w (counts only) carry no gradient; m keeps the
    graph of the projection kernel, so the gradient of this loss reaches the vector through
    the margins only. In multi-process training its gradient is averaged over processes.
    `state_dict()` refreshes `swr_weight` / `swm_margin` from the vector it saves.

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = {}  # until the similarity is set: weights 1, margins 0

    def __init__(self, *, class_counts, window: int = 15, beta: float = 1.0, edge: str = "shift",
                 reduction: str = "weights", projection: list | None = None, similarity: list | None = None):
        super().__init__(class_counts=class_counts)
        try:
            self.window = integer("window", window, low=1)
            self.beta = number("beta", beta, low=0)
            self.edge = choice("edge", edge, EDGES)
            self.reduction = choice("reduction", reduction, REDUCTIONS)
        except ValueError as err:
            raise ConfigError(f"loss 'swrm': {err}") from None
        C = self.num_classes
        self.register_buffer("swr_weight", torch.ones(C))
        self.register_buffer("swm_margin", torch.zeros(C))
        self.vector: nn.Parameter | None = None
        self.learning = False
        self.neutral = True  # w = 1, m = 0: plain F.cross_entropy (bitwise as the `ce` loss)
        if similarity is not None and projection is None:
            raise ConfigError("loss 'swrm': similarity needs a projection too (the projection orders the windows)")
        if projection is not None:
            self.set_similarity(self._check_projection(projection), self._check_similarity(similarity))

    # -- inputs
    def _check_projection(self, projection) -> torch.Tensor:
        try:
            p = torch.as_tensor(projection, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError("loss 'swrm': projection must be a list of numbers") from None
        if p.shape != (self.num_classes,) or not bool(torch.isfinite(p).all()):
            raise ConfigError(f"loss 'swrm': projection must be {self.num_classes} finite numbers, "
                              f"got shape {tuple(p.shape)}")
        return p

    def _check_similarity(self, similarity) -> torch.Tensor | None:
        if similarity is None:
            return None
        C = self.num_classes
        try:
            s = torch.as_tensor(similarity, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError("loss 'swrm': similarity must be a C x C list of numbers") from None
        if s.shape != (C, C) or not bool(((s > 0) & (s <= 1)).all()):
            raise ConfigError(f"loss 'swrm': similarity must be a {C} x {C} matrix with entries in (0, 1]")
        return s

    # -- similarity
    def weights_and_margins(self, projection: torch.Tensor, similarity: torch.Tensor | None = None):
        """(w (C,), m (C,)) of Eq. 2 / Eq. 3 for a projection; m keeps its autograd graph."""
        w, m, _ = weights_and_margins(projection, self.class_counts.cpu().numpy(), window=self.window,
                                      beta=self.beta, edge=self.edge, similarity=similarity)
        return w, m

    @torch.no_grad()
    def set_similarity(self, projection, similarity=None) -> None:
        """Fix w and m from a projection (C,) and an optional similarity matrix (C, C)."""
        p = self._check_projection(torch.as_tensor(projection).detach().cpu())
        w, m = self.weights_and_margins(p, self._check_similarity(similarity))
        self.swr_weight.copy_(w.to(self.swr_weight))
        self.swm_margin.copy_(m.to(self.swm_margin))
        self.neutral = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.neutral = bool(self.swr_weight.eq(1).all() and self.swm_margin.eq(0).all())

    def add_learnable_vector(self, init: torch.Tensor) -> nn.Parameter:
        """DySWRM: make the projection a learnable (C,) parameter starting at `init`."""
        init = torch.as_tensor(init, dtype=torch.float32).detach().clone()
        if init.shape != (self.num_classes,):
            raise ValueError(f"the similarity vector must have shape ({self.num_classes},), got {tuple(init.shape)}")
        self.vector = nn.Parameter(init.to(self.class_counts.device))
        self.vector.register_hook(_mean_over_ranks)
        return self.vector

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # DySWRM: the stored weights / margins are those of the vector being saved
        if self.vector is not None and self.learning:
            with torch.no_grad():
                w, m = self.weights_and_margins(self.vector.detach())
                self.swr_weight.copy_(w.to(self.swr_weight))
                self.swm_margin.copy_(m.to(self.swm_margin))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- loss
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.vector is not None and self.learning:
            w, m = self.weights_and_margins(self.vector)
            w, m = w.to(logits), m.to(logits)
        elif self.neutral and self.class_weight is None:
            return F.cross_entropy(logits, target)  # stage 1 of `swrm`: the same numbers as `ce`
        else:
            w, m = self.swr_weight.to(logits), self.swm_margin.to(logits)
        cw = None if self.class_weight is None else self.class_weight.to(logits)
        return swrm_loss(logits, target, weights=w, margins=m, class_weight=cw, reduction=self.reduction)
