"""The Method contract: the hooks the one training loop calls.

A method builds the model, loss and sampler of its stage and may change how a batch
becomes a loss (mixup, ISDA), which parameters train, which modules are in train mode
(frozen BN for cRT), and what happens per epoch (re-weighting, ISDA's lambda schedule).
Post-hoc methods (tau-normalisation, NCM) set `trains = False` and implement
`fit_posthoc` instead of gradient steps. Method state that must survive a resume goes
through `state_dict` / `load_state_dict` (saved in the checkpoint).
"""

from __future__ import annotations

import math

import torch

from ..data.mixup import mixup_batch
from ..data.samplers import Sampler, build_sampler
from ..losses import Loss, build_loss, effective_number_weights, inverse_frequency_weights
from ..models import Classifier, build_model, load_weights


def class_weight_for(scheme: str, class_counts, beta: float) -> torch.Tensor | None:
    """Per-class weights of the `reweight` schedule (sum C), or None for 'none'."""
    if scheme == "none":
        return None
    if scheme == "effective_number":
        return effective_number_weights(class_counts, beta)
    if scheme == "inverse_frequency":
        return inverse_frequency_weights(class_counts)
    raise ValueError(f"unknown re-weighting scheme '{scheme}'")


class Method:
    """Default hooks: one stage, the configured model / loss / sampler, RW / DRW, mixup."""

    trains = True

    def __init__(self, *, cfg, data):
        self.cfg, self.data = cfg, data

    # -- building
    def build_model(self) -> Classifier:
        m = self.cfg.model
        model = build_model(m.name, num_classes=self.data.num_classes, in_channels=self.data.channels,
                            head=m.head, params=m.params)
        if m.weights:
            load_weights(model, m.weights)
        return model

    def build_loss(self) -> Loss:
        return build_loss(self.cfg.loss.name, self.cfg.loss.params, class_counts=self.data.class_counts)

    def build_sampler(self) -> Sampler:
        s = self.cfg.sampler
        return build_sampler(s.name, s.params, labels=self.data.train.labels, class_counts=self.data.class_counts,
                             seed=self.cfg.train.seed, epochs=self.cfg.train.epochs)

    def parameters(self, model: Classifier):
        """Parameters the optimiser updates."""
        return model.parameters()

    # -- per epoch / per step
    def set_train_mode(self, model: Classifier) -> None:
        model.train()

    def on_epoch_start(self, epoch: int, loss: Loss) -> None:
        r = self.cfg.reweight
        weight = class_weight_for(r.scheme, self.data.class_counts, r.beta) if epoch >= r.start_epoch else None
        loss.set_class_weight(weight)
        # losses with per-epoch statistics (GHM-CWAP's histograms) learn here that an epoch starts
        hook = getattr(loss, "on_epoch_start", None)
        if callable(hook):
            hook(epoch)

    def logits(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training-time logits (B, C). `forward(images) -> (pooled features, logits)` is the
        (possibly DDP-wrapped) forward pass; `model` gives access to weights. ISDA overrides this."""
        return forward(images)[1]

    def training_loss(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss: Loss,
                      generator: torch.Generator):
        """Returns (scalar loss, logits (B, C)). With train.mixup_alpha > 0 the batch is mixed
        (Zhang et al. 2018, as MiSLAS stage 1): loss = lam * L(z, y_a) + (1 - lam) * L(z, y_b)."""
        alpha = self.cfg.train.mixup_alpha
        if alpha > 0:
            images, target_b, lam = mixup_batch(images, target, alpha=alpha, generator=generator)
            logits = self.logits(model, forward, images, target)
            return lam * loss(logits, target) + (1.0 - lam) * loss(logits, target_b), logits
        logits = self.logits(model, forward, images, target)
        return loss(logits, target), logits

    # -- branching (train/branch.py)
    def plain_ce_epochs(self) -> float:
        """Leading epochs in which this configuration trains exactly like the standard method
        with unweighted `ce` (same steps, no method or loss state), so a run may branch off a
        plain-CE run's checkpoint inside them. Conservative: 0 unless a method says more."""
        return 0

    def _unweighted_epochs(self) -> float:
        r = self.cfg.reweight
        return math.inf if r.scheme == "none" else r.start_epoch

    # -- post-hoc methods
    def fit_posthoc(self, model: Classifier, device) -> dict:
        raise NotImplementedError(f"{type(self).__name__} trains with gradient steps")

    # -- state saved in checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

