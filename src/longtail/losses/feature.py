"""Auxiliary losses on pooled features (B, D) and labels (B,), added to a classification loss.

These are not `LOSSES` entries (they see features, not logits); methods/feature_loss.py adds
them to the configured loss: L = L_cls(logits, y) + lambda * L_feat(features, y).

* `range` -- Range loss (Zhang et al., "Range Loss for Deep Face Recognition with Long-Tailed
  Training Data", ICCV 2017, Eqs. 2-4). No official code was released (the paper's Caffe layer
  is not public); the reading follows the paper and the public Caffe port
  Charrin/RangeLoss-Caffe (range_loss_layer.cpp, commit 2cf1fd55): squared Euclidean
  distances; per class in the batch the harmonic mean of its k largest intra-class pair
  distances, summed over classes; the inter-class term is max(m - D_center, 0) with D_center
  the smallest squared distance between two class centres (batch means).
* `lifted` -- smooth lifted structured loss (Oh Song et al., CVPR 2016, Eq. 4), as the official
  Caffe layer rksltnl/Caffe-Deep-Metric-Learning-CVPR16
  src/caffe/layers/lifted_struct_similarity_softmax_layer.cpp (commit 7e416f66).
* `dro_loss` -- the distributional-robustness loss of DRO-LT (Samuel & Chechik, ICCV 2021), as
  the official `losses.py` of dvirsamuel/DRO-LT (commit 1960518d); used by methods/dro_lt.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import choice, integer, number

_TINY = 1e-12  # floor of squared distances: sqrt / reciprocal stay finite (their gradient there is 0)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) squared Euclidean distances, computed from differences (exact, >= 0)."""
    diff = a.unsqueeze(1) - b.unsqueeze(0)
    return (diff * diff).sum(-1)


def range_loss(features: torch.Tensor, target: torch.Tensor, *, k: int = 2, alpha: float = 1e-4,
               beta: float = 1e-3, margin: float = 2e4) -> torch.Tensor:
    """Range loss L_R = alpha * L_intra + beta * L_inter over one batch (Zhang et al. 2017).

    L_intra = sum_c k_c / sum_{j<=k_c} 1 / D_{c,j}   (Eq. 3; D_{c,j} the j-th largest squared
    distance between two samples of class c in the batch; k_c = min(k, number of such pairs);
    a class with one sample in the batch has no pair and adds 0).
    L_inter = max(margin - min_{c != c'} ||mu_c - mu_c'||^2, 0)   (Eq. 4; mu_c the batch mean of
    class c; 0 with fewer than two classes in the batch).

    features (B, D) float, target (B,) int64 -> scalar.
    """
    intra = features.new_zeros(())
    classes = torch.unique(target)
    centres = []
    for c in classes.tolist():
        x = features[target == c]
        centres.append(x.mean(0))
        n = x.shape[0]
        if n < 2:
            continue
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        d = ((x[i] - x[j]) ** 2).sum(-1)
        top = torch.topk(d, min(k, d.numel())).values.clamp_min(_TINY)
        intra = intra + top.numel() / (1.0 / top).sum()
    inter = features.new_zeros(())
    if len(centres) >= 2:
        mu = torch.stack(centres)
        i, j = torch.triu_indices(len(centres), len(centres), offset=1, device=mu.device)
        d_centre = ((mu[i] - mu[j]) ** 2).sum(-1).min()
        inter = torch.clamp(margin - d_centre, min=0.0)
    return alpha * intra + beta * inter


def lifted_structured_loss(features: torch.Tensor, target: torch.Tensor, *, margin: float = 1.0) -> torch.Tensor:
    """Smooth lifted structured loss (Oh Song et al. 2016, Eq. 4), as the official Caffe layer.

    D_ij = ||f_i - f_j||_2 (not squared). For each positive pair i < j (same label):
    J_ij = log( sum_{k: y_k != y_i} exp(margin - D_ik) + sum_{l: y_l != y_j} exp(margin - D_jl) ) + D_ij,
    loss = sum_{(i,j)} max(J_ij, 0)^2 / (2 |P|). A batch without positive pairs or without
    negatives (a single class) gives 0 (the official divides by |P| = 0 there).

    features (B, D) float, target (B,) int64 -> scalar.
    """
    dist = _squared_distances(features, features).clamp_min(_TINY).sqrt()
    same = target.unsqueeze(0) == target.unsqueeze(1)
    b = target.shape[0]
    pos_i, pos_j = torch.triu_indices(b, b, offset=1, device=features.device)
    keep = same[pos_i, pos_j]
    pos_i, pos_j = pos_i[keep], pos_j[keep]
    if pos_i.numel() == 0 or bool(same.all()):
        return features.sum() * 0.0
    # per anchor: log sum over its negatives of exp(margin - D); every anchor has one (>= 2 classes)
    neg = (margin - dist).masked_fill(same, float("-inf"))
    soft = torch.logsumexp(neg, dim=1)  # (B,)
    j_ij = torch.logaddexp(soft[pos_i], soft[pos_j]) + dist[pos_i, pos_j]
    return (torch.clamp(j_ij, min=0.0) ** 2).sum() / (2.0 * pos_i.numel())


class RangeLoss(nn.Module):
    """`range_loss` with validated keyword-only hyper-parameters (defaults: k 2, alpha 1e-4,
    beta 1e-3, margin 2e4: the values of the public Caffe port for face features)."""

    def __init__(self, *, k: int = 2, alpha: float = 1e-4, beta: float = 1e-3, margin: float = 2e4):
        super().__init__()
        self.k = integer("k", k, low=1)
        self.alpha = number("alpha", alpha, low=0)
        self.beta = number("beta", beta, low=0)
        self.margin = number("margin", margin, low=0)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return range_loss(features, target, k=self.k, alpha=self.alpha, beta=self.beta, margin=self.margin)


class LiftedStructuredLoss(nn.Module):
    """`lifted_structured_loss` with a validated margin (default 1, the official prototxt)."""

    def __init__(self, *, margin: float = 1.0):
        super().__init__()
        self.margin = number("margin", margin, low=0)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lifted_structured_loss(features, target, margin=self.margin)


FEATURE_LOSSES: dict[str, type[nn.Module]] = {"range": RangeLoss, "lifted": LiftedStructuredLoss}


def build_feature_loss(name: str, params: dict | None = None) -> nn.Module:
    """The feature loss `name` ('range' | 'lifted') built with keyword `params`; ValueError
    naming the allowed values otherwise."""
    choice("feature_loss", name, tuple(FEATURE_LOSSES))
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"feature_params must be a mapping, got {params!r}")
    try:
        return FEATURE_LOSSES[name](**(params or {}))
    except TypeError as err:
        raise ValueError(f"feature loss '{name}': {err}") from None


# -- DRO-LT ------------------------------------------------------------------------------------

EPSILON_ORDERS = ("official", "per_sample")
SOFTMAX_AXES = ("batch", "classes")


def dro_loss(features: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor, epsilons: torch.Tensor, *,
             temperature: float = 1.0, epsilon_order: str = "official", softmax_over: str = "batch") -> torch.Tensor:
    """The DRO-LT robustness loss of one batch (official `DROLoss.forward`, base_temperature =
    temperature as its training script).

    S_{c,i} = -||mu_c - f_i||_2 for every class centroid mu_c (C, D) and sample f_i (B, D); the
    positive entry (y_i, i) becomes -(||mu_{y_i} - f_i|| + eps): the worst case in an eps-ball
    around the estimated centroid. logits = S / T.

    softmax_over 'batch' (official): log p = log_softmax over the batch samples, per centroid
    (dim 1 of the (C, B) matrix); 'classes' (the paper's reading, Eq. 9): over the centroids, per
    sample. Then for each class c in the batch the mean of log p[c, i] over its samples i, and
    loss = -mean over the classes in the batch.

    epsilon_order 'official': the official assigns `S[mask] -= eps[target]` with a (C, B)
    boolean mask, which visits the positives ordered by class then index, while eps[target] is
    in batch order; so sample order[k] (order = stable argsort of target) receives
    eps[target[k]] -- its own class's epsilon only when the batch is sorted by class.
    'per_sample': every sample gets its own class's epsilon.

    features (B, D), target (B,), centroids (C, D), epsilons (C,) -> scalar.
    """
    dist = _squared_distances(centroids, features).clamp_min(_TINY).sqrt()  # (C, B)
    if epsilon_order == "official":
        order = torch.sort(target, stable=True).indices
        eps = torch.empty_like(dist[0]).index_put((order,), epsilons[target].to(dist.dtype))
    else:
        eps = epsilons[target].to(dist.dtype)
    positive = torch.zeros_like(dist, dtype=torch.bool)
    positive[target, torch.arange(target.shape[0], device=target.device)] = True
    logits = -(dist + positive * eps.unsqueeze(0)) / temperature
    log_prob = torch.log_softmax(logits, dim=1 if softmax_over == "batch" else 0)
    pos = log_prob[target, torch.arange(target.shape[0], device=target.device)]  # (B,)
    classes, inverse = torch.unique(target, return_inverse=True)
    per_class = torch.zeros(len(classes), dtype=pos.dtype, device=pos.device).index_add(0, inverse, pos)
    per_class = per_class / torch.bincount(inverse, minlength=len(classes)).to(pos.dtype)
    return -per_class.mean()
