"""Expert splits of a ResNet: shared early stages, then E experts with their own later stages and heads.

The multi-expert network of RIDE (Wang et al., ICLR 2021; official frank-xwang/RIDE-LongTailRecognition,
commit ab8be5c21124612493aff87c7cf235d950bda178: `model/ldam_drw_resnets/ride_resnet_cifar.py`
`ResNet_s` and `model/fb_resnets/RIDEResNet.py` `ResNet`). The option is the model parameter

    model.params.experts: {num: 3, shared_stages: 1, widths: ride, scale: 30.0}

- ``num`` (E >= 1): number of experts.
- ``shared_stages``: how many residual stages (after the stem) all experts share. The official CIFAR
  network shares layer1 (1), the ImageNet one layer1 + layer2 (2; ``share_layer3`` is 3). ``none``
  (CIFAR ResNets only) shares nothing: each expert is a whole network with its own stem (NCL,
  Li et al. CVPR 2022, official Bazinga699/NCL ``multi_Network``: three independent ResNet-32s).
- ``widths``: the channel widths of each expert's own stages, a list with one int per expert stage,
  ``full`` (the plain network's widths, the default) or ``ride`` (the official ``reduce_dimension``:
  3/4 of the plain widths, 24/48 on CIFAR ResNets, 192/384 for the last two ImageNet stages).
- ``scale`` (s): expert logits are s * head(features); RIDE uses s = 30 with the cosine head.

Each expert has its own head, built from the model's ``head`` parameter (``cosine`` is the official
``use_norm``). The expert stage modules are named as the official code (``layer2s.<e>``, ``layer3s.<e>``,
``linears.<e>`` on CIFAR; ``layer3s``, ``layer4s``, ``linears`` on ImageNet), so its checkpoints'
``backbone.*`` tensors have our names.

The model contract holds: ``forward_features`` returns the experts' maps concatenated on the channel axis
(B, E*D, h, w), ``forward_head`` pools and applies :class:`ExpertHeads` (the mean of the E scaled expert
logits, the official ``final_out``), so ``forward`` = eval / predict / export = the expert mean.
``expert_outputs(images)`` gives the per-expert logits (E, B, C) and pooled features (E, B, D) for methods.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertSpec:
    num: int
    shared_stages: int
    widths: tuple[int, ...]
    scale: float

    @property
    def independent(self) -> bool:
        """Nothing shared (``shared_stages: none``): every expert has its own stem and stages."""
        return self.shared_stages == 0


DEFAULT_NUM = 3  # experts.num when the mapping leaves it out


def configured_num(value) -> int | None:
    """The expert count ``model.params.experts`` (``value``) asks for, without building anything:
    0 when absent (the plain network), None when malformed (``parse_experts`` names the bad key
    when the network is built)."""
    if value is None:
        return 0
    if not isinstance(value, dict):
        return None
    num = value.get("num", DEFAULT_NUM)
    return num if isinstance(num, int) and not isinstance(num, bool) else None


def parse_experts(value, *, plain_widths: tuple[int, ...], min_shared: int = 1,
                  allow_independent: bool = False) -> ExpertSpec | None:
    """Validate ``model.params.experts`` for a network whose stages have ``plain_widths``.

    None / absent -> None (the plain network). Raises ValueError naming the bad key.
    ``shared_stages: none`` (only where ``allow_independent``) gives ``ExpertSpec.shared_stages == 0``
    with ``independent`` true: nothing shared, not even the stem.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"experts must be a mapping {{num, shared_stages, widths, scale}}, got {value!r}")
    unknown = sorted(set(value) - {"num", "shared_stages", "widths", "scale"})
    if unknown:
        raise ValueError(f"experts: unknown key(s) {unknown}; allowed: num, shared_stages, widths, scale")
    num = value.get("num", DEFAULT_NUM)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"experts.num must be an integer >= 1, got {num!r}")
    n_stages = len(plain_widths)
    shared = value.get("shared_stages", min_shared)
    if allow_independent and shared == "none":
        shared = 0
    elif isinstance(shared, bool) or not isinstance(shared, int) or not min_shared <= shared <= n_stages - 1:
        also = " or 'none' (independent networks, own stems)" if allow_independent else ""
        raise ValueError(f"experts.shared_stages must be an integer in [{min_shared}, {n_stages - 1}]{also}, "
                         f"got {shared!r}")
    own = plain_widths[shared:]
    widths = value.get("widths", "full")
    if widths == "full":
        widths = tuple(own)
    elif widths == "ride":
        widths = tuple(w * 3 // 4 for w in own)
    elif isinstance(widths, (list, tuple)) and len(widths) == len(own) and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        widths = tuple(widths)
    else:
        raise ValueError(f"experts.widths must be 'full', 'ride' or a list of {len(own)} positive integers "
                         f"(one per expert stage), got {widths!r}")
    scale = value.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"experts.scale must be a number > 0, got {scale!r}")
    return ExpertSpec(num=num, shared_stages=shared, widths=widths, scale=float(scale))


class ExpertHeads(nn.ModuleList):
    """E heads over the concatenated pooled expert features (B, E*D) -> mean_e s * head_e(f_e), (B, C).

    A ModuleList so that the head tensors are ``<head_name>.<e>.weight`` (the official ``linears``).
    """

    def __init__(self, heads: list[nn.Module], *, scale: float = 1.0):
        super().__init__(heads)
        self.scale = float(scale)
        self.stacked = False  # True inside ExpertNetwork.per_expert(): forward gives (B, E, C)

    def per_expert(self, features: torch.Tensor) -> torch.Tensor:
        """features: (E, B, D) or the concatenation (B, E*D) -> logits (E, B, C)."""
        if features.dim() == 2:
            features = torch.stack(features.chunk(len(self), dim=1))
        return torch.stack([head(f) * self.scale for head, f in zip(self, features)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.per_expert(features)
        return logits.transpose(0, 1) if self.stacked else logits.mean(dim=0)


class ExpertNetwork:
    """Mixin of the expert-split ResNets: needs ``_shared(images)``, ``expert_branch(shared, e)``,
    ``num_experts`` and the :class:`ExpertHeads` at ``self.head``."""

    num_experts: int

    def _shared(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_branch(self, shared: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def per_expert(self):
        """Inside the block the head returns every expert's logits, (B, E, C), instead of their mean:
        a method's training pass goes through the loop's (DDP-wrapped) forward this way."""
        if not self.num_experts:
            raise RuntimeError("this network has no experts (model.params.experts is not set)")
        self.head.stacked = True
        try:
            yield self
        finally:
            self.head.stacked = False

    def shared_features(self, images: torch.Tensor) -> torch.Tensor:
        """The map after the stem and the shared stages (what every expert reads); the images
        themselves for independent experts (``shared_stages: none``)."""
        return self._shared(images)

    def expert_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.num_experts:
            raise RuntimeError("this network has no experts (model.params.experts is not set)")
        shared = self._shared(images)
        return [self.expert_branch(shared, e) for e in range(self.num_experts)]

    def expert_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (E, B, C), pooled features (E, B, D)); logits are s * head_e(features_e)."""
        feats = torch.stack([m.mean(dim=(2, 3)) for m in self.expert_maps(images)])
        return self.head.per_expert(feats), feats

    def expert_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.expert_outputs(images)[0]

    def expert_head(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s scaled logits from its pooled features (B, D) -> (B, C)."""
        return self.head[index](features) * self.head.scale
