"""The model contract every backbone follows.

- ``forward_features(images)``: (B, C_in, H, W) -> pre-pooling map (B, D, h, w).
- ``forward_head(features, pre_logits=False)``: global average pool, then the classifier;
  with ``pre_logits=True`` returns the pooled (B, D) features (for prototypes, cRT, NCM).
- ``forward(images)`` = ``forward_head(forward_features(images))`` -> (B, num_classes).
- ``num_features`` = D; ``head`` is the classifier module; ``reset_head(module)``
  replaces it (decoupled methods, SSP fine-tuning).
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    head_name = "fc"  # attribute that holds the classifier; kept for state_dict compatibility
    num_features: int

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_head(self, module: nn.Module) -> None:
        setattr(self, self.head_name, module)
