"""Classifier heads: (B, D) pooled features -> (B, C) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import HEADS


@HEADS.register("linear")
def linear_head(*, in_features: int, num_classes: int) -> nn.Module:
    """Linear layer with bias (the classifier of every CE baseline)."""
    return nn.Linear(in_features, num_classes)


@HEADS.register("cosine")
class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW (`NormedLinear`): logits = normalize(x) @ normalize(W).

    The weight is stored as (in_features, num_classes), as in the official code, so its
    checkpoints load; initialised uniform(-1, 1) and renormalised to unit-norm columns.
    Outputs are pure cosines in [-1, 1], no bias, no scale (LDAM's s multiplies in the loss).
    """

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=0)


def build_head(name: str, *, in_features: int, num_classes: int) -> nn.Module:
    return HEADS.build(name, in_features=in_features, num_classes=num_classes)


class TauNormLinear(nn.Module):
    """tau-normalised classifier (Kang et al., ICLR 2020, Sec. 4): w_i / ||w_i||^tau, no bias.

    As classifier-balancing's `tau_norm.py`: row-wise norms over classes, the bias of the
    stage-1 linear layer is dropped. `tau` is a buffer, saved with the weights.
    """

    def __init__(self, weight: torch.Tensor, *, tau: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("tau", torch.tensor(float(tau)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        norms = self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return features @ (self.weight / norms.pow(self.tau)).t()


class LWSHead(nn.Module):
    """Learnable weight scaling (Kang et al. 2020): logits = (W x + b) * s, per-class s (init 1).

    The stage-1 linear layer is frozen; only `scales` train. As classifier-balancing, the
    bias is scaled too.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(linear.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * self.scales


class NCMHead(nn.Module):
    """Nearest class mean ('cl2n', l2) of classifier-balancing `KNNClassifier`.

    x_hat = (x - mu) / ||x - mu|| with mu the mean training feature; centroids are the
    per-class means of x_hat (not re-normalised); logit_c = -||x_hat - c_c||^2.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("centroids", torch.zeros(num_classes, num_features))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features - self.feature_mean, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.normalise(features)
        # ||x - c||^2 written out: one matmul, and exportable with torch.export at any batch size
        return -(x.pow(2).sum(1, keepdim=True) - 2 * x @ self.centroids.t() + self.centroids.pow(2).sum(1))
