"""OLTR's discriminative centroid loss (Liu et al., CVPR 2019, Eq. 6; official
zhmiao/OpenLongTailRecognition-OLTR at f50e375f, loss/DiscCentroidsLoss.py).

For direct features f (B, D), labels y (B,) and centroids c (C, D):

    attract = sum_i |f_i - c_{y_i}|^2 / (2 B)
    repel   = clamp(margin - sum_{i, k != y_i} |f_i - c_k|^2 / (B C), 0, 1e6)   (margin 10)
    loss    = attract + repel_weight * repel                                    (repel_weight 0.01)

The repelling sum runs over the B x C distance matrix with the positives set to 0 and is divided
by B * C (positives included), as the official code. The official attracting term has a
hand-written backward (`centroid_grad='official'`): the feature gradient is the true one,
g * (f_i - c_{y_i}) / B, but the centroid gradient is the centre-loss update
sum_{i: y_i = k} (c_k - f_i) / ((1 + n_k) B) with n_k the class's count in the batch, and it is
**not** multiplied by the incoming gradient g, so the loss weight (0.01 in the official config)
does not scale it. `centroid_grad='autograd'` uses the true gradient of the formula instead.
Not a registered loss: the OLTR method adds it to the classification loss.
"""

from __future__ import annotations

import torch

CENTROID_GRADS = ("official", "autograd")


class _Attract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, target, centroids):
        ctx.save_for_backward(features, target, centroids)
        return (features - centroids[target]).pow(2).sum() / 2.0 / features.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        features, target, centroids = ctx.saved_tensors
        batch = features.shape[0]
        diff = centroids[target] - features  # (B, D)
        grad_features = -grad_output * diff / batch if ctx.needs_input_grad[0] else None
        grad_centroids = None
        if ctx.needs_input_grad[2]:
            counts = torch.ones(centroids.shape[0], dtype=centroids.dtype, device=centroids.device)
            counts.index_add_(0, target, torch.ones_like(target, dtype=centroids.dtype))
            sums = torch.zeros_like(centroids).index_add_(0, target, diff)
            grad_centroids = sums / counts[:, None] / batch  # the official: not scaled by grad_output
        return grad_features, None, grad_centroids


def attract_loss(features: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor, *,
                 centroid_grad: str = "official") -> torch.Tensor:
    if centroid_grad == "official":
        return _Attract.apply(features, target, centroids)
    return (features - centroids[target]).pow(2).sum() / 2.0 / features.shape[0]


def repel_loss(features: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor, *,
               margin: float = 10.0) -> torch.Tensor:
    b, c = features.shape[0], centroids.shape[0]
    dist = (features.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1)[None, :]
            - 2.0 * features @ centroids.t())  # (B, C) squared distances
    positive = torch.nn.functional.one_hot(target, c).bool()
    return torch.clamp(margin - dist.masked_fill(positive, 0.0).sum() / (b * c), 0.0, 1e6)


def disc_centroids_loss(features: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor, *,
                        margin: float = 10.0, repel_weight: float = 0.01,
                        centroid_grad: str = "official") -> torch.Tensor:
    """attract + repel_weight * repel (module doc); features (B, D), target (B,), centroids (C, D)."""
    if centroid_grad not in CENTROID_GRADS:
        raise ValueError(f"centroid_grad must be one of {', '.join(repr(a) for a in CENTROID_GRADS)}, "
                         f"got {centroid_grad!r}")
    loss = attract_loss(features, target, centroids, centroid_grad=centroid_grad)
    if repel_weight:
        loss = loss + repel_weight * repel_loss(features, target, centroids, margin=margin)
    return loss
