"""NCL: nested collaborative learning (Li, Tan, Wan, Lei, Guo, CVPR 2022), the CIFAR recipe without
self-supervision.

Official code read: Bazinga699/NCL at f64fddb3587b7439f3a8b731448a4ab3d3defe26 (`lib/net/network.py`
`multi_Network`, `lib/loss/loss.py` `NIL_NBOD`, `lib/core/combiner.py` `multi_network_default`,
`lib/core/function.py`, `lib/dataset/cui_cifar.py` `MULTI_NETWORK_CIFAR_AUGPLIS`,
`config/CIFAR/CIFAR100/cifar100_im100_NCL.yaml`).

- network: the configured ResNet with `model.params.experts`; the official CIFAR network is three
  independent ResNet-32s (own stems, own BN, own Linear(64, C) heads with bias): `experts: {num: 3,
  shared_stages: none}` on our CIFAR ResNets (models/experts.py);
- each step: one forward of the batch through the loop's (DDP-wrapped) forward inside
  `model.per_expert()`: every expert sees the same augmented images (the official passes the same
  tensor to each network); the loss is the configured `ncl` loss (losses/ncl.py) of the (E, B, C)
  logits; training accuracy is scored on their mean (the official `average_result`);
- prediction: the plain forward, the mean of the raw expert logits (official
  `multi_network_valid_model_final`: mean of `output_ce`, no balanced shift at test time).

Not implemented: the self-supervised MoCo branch (`multi_Network_MOCO`, `CON_RATIO`), which the
official CIFAR NCL config switches off (`MOCO: False`, `CON_RATIO: 0.0`; it is on only in
`cifar100_im100_NCL_with_contrastive.yaml` and the ImageNet-LT / Places / iNat configs), and NCL++.
The method has no state of its own: --resume is exact.
"""

from __future__ import annotations

from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing, require_experts

NCL_EXPERTS = "the official CIFAR {num: 3, shared_stages: none}"


@METHODS.register("ncl")
class NCL(Method):
    """NCL: the `ncl` loss (NIL + NBOD with hard category mining) over the experts of
    `model.params.experts` (see module doc). No method parameters."""

    rebalancing = True

    def __init__(self, *, cfg, data):
        super().__init__(cfg=cfg, data=data)
        refuse_batch_mixing(cfg, "ncl")
        require_experts(cfg, "ncl", example=NCL_EXPERTS)
        if cfg.loss.name != "ncl":
            raise ValueError(f"trains with the 'ncl' loss (loss.name: ncl), got '{cfg.loss.name}'")

    def build_model(self) -> Classifier:
        model = super().build_model()
        require_experts(self.cfg, "ncl", example=NCL_EXPERTS, model=model)
        return model

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        with model.per_expert():
            _, stacked = forward(images)  # (B, E, C)
        experts = stacked.transpose(0, 1)
        return StepResult(loss(experts, target), experts.mean(dim=0), target)
