"""OLTR's network pieces (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
CVPR 2019; official zhmiao/OpenLongTailRecognition-OLTR at f50e375f123fd12dd0ae39e07aa226fadec32f33:
layers/ModulatedAttLayer.py, models/MetaEmbeddingClassifier.py, models/CosNormClassifier.py,
models/ResNetFeature.py).

- `ModulatedAttention`: on the last feature map (B, C, h, w) before pooling,
  out = softmax_hw(W_s vec(x)) * W_m(NL(x)) + x, with NL the embedded-Gaussian non-local block
  (theta, phi, g: 1x1 convolutions C -> C/2; attention softmax over the h*w positions) and W_m a
  1x1 convolution C/2 -> C without bias, initialised to zero (the official init: the layer starts
  as the identity). The official layer hard-codes a 7 x 7 map (ImageNet 224 px); here h, w are the
  backbone's map size (8 x 8 for ResNet-32 on 32 px), so `fc_spatial` is Linear(h*w*C, h*w).
- `CosNormClassifier`: logits = s * (|x| / (1 + |x|)) (x / |x|) . (w_c / |w_c|), s = 16.
- `MetaEmbeddingHead`: the dynamic meta-embedding. With the memory M (C, D) (the class centroids,
  used detached: the official passes `centroids.data`), for a direct feature x (B, D):
  reachability gamma = s_r / min_c |x - M_c| (s_r = 10), hallucinator o = softmax(W_h x),
  memory feature v_mem = o M, concept selector e = tanh(W_e x + b_e), and
  logits = CosNorm(gamma * (x + e * v_mem)).
- `OLTRNetwork`: a stage-1 backbone (its head removed) with the attention on its last map, the
  official stage-2 `fc_add` (Linear + ReLU after pooling, `use_fc: True`) and the meta-embedding
  head; `forward_head(..., pre_logits=True)` gives the direct feature x (after fc_add), the one the
  centroid loss and the memory use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Classifier


class ModulatedAttention(nn.Module):
    """OLTR's modulated attention on a (B, C, h, w) map; the identity at initialisation."""

    def __init__(self, in_channels: int, map_size: tuple[int, int], reduction: int = 2):
        super().__init__()
        if not (isinstance(reduction, int) and reduction >= 1 and in_channels // reduction >= 1):
            raise ValueError(f"reduction must be an integer in [1, {in_channels}], got {reduction!r}")
        self.in_channels, self.inter_channels = in_channels, in_channels // reduction
        self.map_size = (int(map_size[0]), int(map_size[1]))
        hw = self.map_size[0] * self.map_size[1]
        self.g = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.conv_mask = nn.Conv2d(self.inter_channels, in_channels, 1, bias=False)
        self.fc_spatial = nn.Linear(hw * in_channels, hw)
        for m in (self.g, self.theta, self.phi):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.conv_mask.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        if (h, w) != self.map_size or c != self.in_channels:
            raise ValueError(f"modulated attention built for ({self.in_channels}, {self.map_size[0]}, "
                             f"{self.map_size[1]}) maps, got {tuple(features.shape[1:])}")
        g_x = self.g(features).flatten(2).transpose(1, 2)  # (B, hw, C')
        theta_x = self.theta(features).flatten(2).transpose(1, 2)  # (B, hw, C')
        phi_x = self.phi(features).flatten(2)  # (B, C', hw)
        attention = torch.softmax(theta_x @ phi_x, dim=-1)  # (B, hw, hw)
        y = (attention @ g_x).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        mask = self.conv_mask(y)  # (B, C, h, w)
        spatial = torch.softmax(self.fc_spatial(features.reshape(b, -1)), dim=1).view(b, 1, h, w)
        return spatial * mask + features


class CosNormClassifier(nn.Module):
    """OLTR's cosine-norm classifier: s * squash(x) . w_c / |w_c| with squash(x) = x |x| / ((1 + |x|) |x|)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        norm = features.norm(dim=1, keepdim=True)
        squashed = (norm / (1 + norm)) * (features / norm)
        return (self.scale * squashed) @ F.normalize(self.weight, dim=1).t()


class MetaEmbeddingHead(nn.Module):
    """The dynamic meta-embedding classifier (module doc); `centroids` (C, D) is the memory, a
    parameter trained by the discriminative centroid loss only (the head reads it detached)."""

    def __init__(self, in_features: int, num_classes: int, *, reachability_scale: float = 10.0,
                 cosine_scale: float = 16.0):
        super().__init__()
        self.reachability_scale = float(reachability_scale)
        self.hallucinator = nn.Linear(in_features, num_classes)
        self.selector = nn.Linear(in_features, in_features)
        self.cosnorm = CosNormClassifier(in_features, num_classes, scale=cosine_scale)
        self.centroids = nn.Parameter(torch.zeros(num_classes, in_features))
        self.register_buffer("centroids_ready", torch.zeros((), dtype=torch.bool))

    def meta_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) direct features -> (B, D) meta-embedding gamma * (x + e * v_mem)."""
        memory = self.centroids.detach().to(features.dtype)
        dist = torch.cdist(features, memory, compute_mode="donot_use_mm_for_euclid_dist")  # (B, C)
        reachability = self.reachability_scale / dist.min(dim=1, keepdim=True).values
        memory_feature = torch.softmax(self.hallucinator(features), dim=1) @ memory
        selector = torch.tanh(self.selector(features))
        return reachability * (features + selector * memory_feature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cosnorm(self.meta_embedding(features))


class OLTRNetwork(Classifier):
    """A backbone's map through the modulated attention, pooled, fc_add + ReLU, meta-embedding head."""

    head_name = "fc"

    def __init__(self, backbone: Classifier, *, num_classes: int, map_size: tuple[int, int], attention: bool = True,
                 fc_dim: int | None = None, reachability_scale: float = 10.0, cosine_scale: float = 16.0):
        super().__init__()
        backbone.reset_head(nn.Identity())
        self.backbone = backbone
        d = backbone.num_features
        self.attention = ModulatedAttention(d, map_size) if attention else None
        self.fc_add = nn.Linear(d, fc_dim) if fc_dim else None
        self.num_features = fc_dim or d
        self.fc = MetaEmbeddingHead(self.num_features, num_classes, reachability_scale=reachability_scale,
                                    cosine_scale=cosine_scale)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_features(images)
        return self.attention(maps) if self.attention is not None else maps

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features
        if self.fc_add is not None:
            pooled = F.relu(self.fc_add(pooled))
        return pooled if pre_logits else self.head(pooled)
