"""The standard recipe: one stage, any model, loss, sampler and re-weighting schedule.

Re-weighting (`reweight` config section) follows LDAM-DRW's `cifar_train.py`: from
0-idx epoch `start_epoch` on, the loss gets per-class weights (effective number with
`beta`, or inverse frequency), normalised to sum C; before that it is unweighted.
start_epoch = 0 is RW; a later epoch (the first LR decay) is DRW.
"""

from __future__ import annotations

import torch

from ..data.samplers import Sampler, build_sampler
from ..losses import Loss, build_loss, effective_number_weights, inverse_frequency_weights
from ..models import Classifier, build_model, load_weights
from ..registry import METHODS


def class_weight_for(scheme: str, class_counts, beta: float) -> torch.Tensor | None:
    if scheme == "none":
        return None
    if scheme == "effective_number":
        return effective_number_weights(class_counts, beta)
    if scheme == "inverse_frequency":
        return inverse_frequency_weights(class_counts)
    raise ValueError(f"unknown re-weighting scheme '{scheme}'")


class Method:
    """Hooks the training loop calls; subclasses override what their recipe changes."""

    def __init__(self, *, cfg, data):
        self.cfg, self.data = cfg, data

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
        return build_sampler(s.name, s.params, labels=self.data.train.labels,
                             class_counts=self.data.class_counts, seed=self.cfg.train.seed)

    def parameters(self, model: Classifier):
        return model.parameters()

    def on_epoch_start(self, epoch: int, loss: Loss) -> None:
        r = self.cfg.reweight
        weight = class_weight_for(r.scheme, self.data.class_counts, r.beta) if epoch >= r.start_epoch else None
        loss.set_class_weight(weight)

    def training_loss(self, model: Classifier, images: torch.Tensor, target: torch.Tensor, loss: Loss):
        """Returns (scalar loss, logits (B, C))."""
        logits = model(images)
        return loss(logits, target), logits


@METHODS.register("standard")
class Standard(Method):
    """One-stage training with the configured model, loss, sampler and re-weighting."""

    def __init__(self, *, cfg, data):
        super().__init__(cfg=cfg, data=data)
