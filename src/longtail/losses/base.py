"""Base class of the losses: nn.Module(logits, target) built from class_counts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def effective_number_weights(class_counts, beta: float) -> torch.Tensor:
    """Class-balanced weights of Cui et al. (CVPR 2019), Eq. 3 / LDAM-DRW `cifar_train.py`.

    w_c = (1 - beta) / (1 - beta^n_c), normalised so that sum_c w_c = C. beta = 0 gives
    all ones; beta -> 1 approaches inverse frequency. Returns float32 (C,).
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)  # an empty class would give 0/0
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    w = w / w.sum() * len(n)
    return torch.tensor(w, dtype=torch.float32)


def inverse_frequency_weights(class_counts) -> torch.Tensor:
    """w_c proportional to 1 / n_c, normalised so that sum_c w_c = C."""
    n = np.asarray(class_counts, dtype=np.float64)
    w = 1.0 / np.maximum(n, 1.0)
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


class Loss(nn.Module):
    """A loss over (B, C) logits and (B,) int64 targets; optional per-class weights.

    `class_weight` is None (unweighted) or a (C,) tensor set by a re-weighting schedule
    (RW from epoch 0, DRW from a later epoch) through `set_class_weight`.

    Class attributes a registered loss states:

    * `rebalancing`: True where the loss's optimum already aims at balanced classes (so a
      post-hoc adjustment toward a uniform prior would adjust twice: inference.py).
    * `neutral_params`: keyword arguments that make the loss exactly `F.cross_entropy`, or None
      where no parameter setting does, with the reason in a comment. Deliberately no default
      here: every registered loss must say it in its own class body (tests/test_losses.py).
    * `logit_prior`: the label distribution the trained raw logits are calibrated to, which
      post-hoc adjustment toward a stated prior p_t starts from (`logit_adjust.source_prior`):
      'train' (default: logits + log p_t - log pi_train) or 'uniform' (LADE's post-compensation:
      logits + log p_t; a uniform target leaves the logits as they are).
    * `host_syncs`: one-line reasons why a training step with this loss reads device values on
      the host (a CUDA graph cannot capture it; issue 21, `Method.capture_blockers`); () where the
      loss's forward, backward and `sync_statistics` never do (tests/test_host_sync.py checks it).
    """

    rebalancing = False
    host_syncs: tuple[str, ...] = ()
    logit_prior = "train"
    neutral_params: dict | None  # no default: each registered loss states its own

    @classmethod
    def calibrated_prior(cls, class_counts, params: dict) -> np.ndarray:
        """pi (C,) float64 that a run's raw logits are calibrated to, built with `params`: the
        training prior n / sum(n), or uniform where `logit_prior = 'uniform'`. Post-hoc adjustment
        toward a stated prior starts from it (`logit_adjust.source_prior`)."""
        n = np.asarray(class_counts, dtype=np.float64)
        if cls.logit_prior == "uniform":
            return np.full(n.shape, 1.0 / n.size)
        return n / n.sum()

    def __init__(self, *, class_counts):
        super().__init__()
        self.register_buffer("class_counts", torch.as_tensor(np.asarray(class_counts), dtype=torch.float32))
        self.class_weight: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def set_class_weight(self, weight: torch.Tensor | None) -> None:
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32, device=self.class_counts.device)
            if weight.shape != (self.num_classes,):
                raise ValueError(f"class weight must have shape ({self.num_classes},), got {tuple(weight.shape)}")
        self.class_weight = weight
