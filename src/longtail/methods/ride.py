"""RIDE: routing diverse distribution-aware experts (Wang, Lian, Miao, Liu, Yu, ICLR 2021), stage 1.

Official code read: frank-xwang/RIDE-LongTailRecognition at ab8be5c21124612493aff87c7cf235d950bda178
(`model/loss.py` `RIDELoss`, `model/ldam_drw_resnets/ride_resnet_cifar.py` `ResNet_s`,
`trainer/trainer.py`, `configs/config_imbalance_cifar100_ride.json`).

- network: the configured ResNet with `model.params.experts` (models/experts.py); the official
  CIFAR recipe is ResNet-32, 3 experts, layer1 shared, `reduce_dimension` widths 24/48 (`widths: ride`),
  cosine heads (`use_norm`, `model.head: cosine`) with s = 30 (`experts.scale: 30`);
- each step: one forward of the batch through the loop's (DDP-wrapped) forward inside
  `model.per_expert()`, so the head returns the E experts' logits (B, E, C); the loss is the
  configured `ride` loss (losses/ride.py) of the (E, B, C) logits; training accuracy is scored on
  their mean (the official `output`);
- DRW: the run's `reweight` section (effective number, beta 0.9999, from 0-idx epoch 160 of 200,
  official `reweight_epoch: 160` with its 1-based `epoch > 160`); the ride loss switches its
  per-class diversity temperatures on with the class weights, as the official does;
- prediction: the plain forward, the mean of the expert logits (official `final_out`); all experts,
  the router (EA) is a second stage not implemented here.

Not implemented: the official `use_experts: rand` option (a random E-1 subset of experts per
forward), the expert-assignment router stage, the distillation variant (`RIDELossWithDistill`).
The method has no state of its own: --resume is exact.
"""

from __future__ import annotations

from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult


@METHODS.register("ride")
class RIDE(Method):
    """RIDE stage 1: the `ride` loss over the experts of `model.params.experts` (see module doc).
    No method parameters."""

    rebalancing = True

    def __init__(self, *, cfg, data):
        super().__init__(cfg=cfg, data=data)
        if cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0:
            raise ValueError("RIDE does not mix batches; set train.mixup_alpha: 0 and train.cutmix_alpha: 0")
        if not (cfg.model.params or {}).get("experts"):
            raise ValueError(f"needs a multi-expert network: set model.params.experts (e.g. {{num: 3, "
                             f"shared_stages: 1, widths: ride, scale: 30}}; model is '{cfg.model.name}')")
        if cfg.loss.name != "ride":
            raise ValueError(f"trains with the 'ride' loss (loss.name: ride), got '{cfg.loss.name}'")
        self._scale: float | None = None

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not getattr(model, "num_experts", 0):
            raise ValueError(f"model '{self.cfg.model.name}' has no expert split (model.params.experts)")
        self._scale = model.head.scale
        return model

    def build_loss(self):
        loss = super().build_loss()
        if self._scale is not None and abs(loss.s - self._scale) > 1e-12:
            raise ValueError(f"loss.params.s ({loss.s:g}) must equal model.params.experts.scale ({self._scale:g}): "
                             f"the margin is s * m_c on logits the model already scaled by s")
        return loss

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        with model.per_expert():
            _, stacked = forward(images)  # (B, E, C)
        experts = stacked.transpose(0, 1)
        return StepResult(loss(experts, target), experts.mean(dim=0), target)
