"""FSLwF's classifier (Gidaris & Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting",
CVPR 2018; official gidariss/FewShotWithoutForgetting at 0efdc78ceddf2395b5b0bef4f789f9d63c761b9b,
architectures/ClassifierWithFewShotGenerationModule.py, `classifier_type: cosine`,
`weight_generator_type: attention_based`).

Cosine classifier (Eq. 2 with the official learnable scalar bias):
    logits = s * (x/|x| . w_c/|w_c| + b)            s = scale_cls (init 10), b (init 0), both learned
Attention-based few-shot weight generator (Eqs. 3-4): for a novel class with exemplar features
z_1..z_N (normalised), over the base classes B with weights w_b and keys k_b,
    w_avg = mean_i z_i / |z_i|
    w_att = mean_i sum_b softmax_b(s_att * cos(Q z_i, k_b)) w_b / |w_b|     (Q: D x D, init I + 0.001 N)
    w'    = phi_avg (.) w_avg + phi_att (.) w_att                              (phi: per-dim, init 1)
s_att is learned (init 10, the official ImageNet config uses 30). Shapes: features (B, D); exemplar
features (N, D) with one-hot labels (N, K); weights (C, D). The head stores every class's base
weight; the classes marked `novel` are scored with `novel_weight`, the weights generated from
their training features (`generate_novel`), a buffer saved with the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FewShotCosineHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, novel, *, scale_cls: float = 10.0,
                 scale_att: float = 10.0):
        super().__init__()
        novel = torch.as_tensor(novel, dtype=torch.bool)
        if novel.shape != (num_classes,):
            raise ValueError(f"novel must be a ({num_classes},) mask, got shape {tuple(novel.shape)}")
        d = in_features
        self.weight_base = nn.Parameter(torch.randn(num_classes, d) * math.sqrt(2.0 / d))
        self.bias = nn.Parameter(torch.zeros(1))
        self.scale_cls = nn.Parameter(torch.full((1,), float(scale_cls)))
        self.query = nn.Linear(d, d)
        with torch.no_grad():
            self.query.weight.copy_(torch.eye(d) + torch.randn(d, d) * 0.001)
            self.query.bias.zero_()
        self.keys = nn.Parameter(torch.randn(num_classes, d) * math.sqrt(2.0 / d))
        self.scale_att = nn.Parameter(torch.full((1,), float(scale_att)))
        self.phi_avg = nn.Parameter(torch.ones(d))
        self.phi_att = nn.Parameter(torch.ones(d))
        self.register_buffer("novel", novel.clone())
        self.register_buffer("novel_weight", torch.zeros(num_classes, d))

    def classification_weights(self) -> torch.Tensor:
        """(C, D): the base weights, the generated ones for the novel classes."""
        return torch.where(self.novel[:, None], self.novel_weight.to(self.weight_base.dtype), self.weight_base)

    def scores(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """s * (cos(x, w) + b): features (B, D), weights (K, D) -> (B, K)."""
        return self.scale_cls * (F.normalize(features, dim=1) @ F.normalize(weights, dim=1).t() + self.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features, self.classification_weights())

    def generate(self, exemplars: torch.Tensor, onehot: torch.Tensor, base_ids: torch.Tensor) -> torch.Tensor:
        """Weights (K, D) of K classes from exemplar features (N, D) with one-hot labels (N, K),
        attending over the base classes `base_ids` (nb,)."""
        z = F.normalize(exemplars, dim=1)
        per_class = onehot.t() / onehot.sum(0)[:, None]  # (K, N): the mean over each class's exemplars
        w_avg = per_class @ z
        q = F.normalize(self.query(z), dim=1)
        k = F.normalize(self.keys[base_ids], dim=1)
        attention = torch.softmax(self.scale_att * (q @ k.t()), dim=1)  # (N, nb)
        w_att = per_class @ (attention @ F.normalize(self.weight_base[base_ids], dim=1))
        return self.phi_avg * w_avg + self.phi_att * w_att
