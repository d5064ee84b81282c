"""Influence-balanced loss (Park et al., "Influence-Balanced Loss for Imbalanced Visual
Classification", ICCV 2021), as the official code computes it (pseulki/IB-Loss, `losses.py`,
`IBLoss` / `IB_FocalLoss`, commit b29b8b005f614292e9ae8b43903a6f7df8ef09a6).

The loss needs the pooled features h (B, D) besides the logits, so it is not a `Loss`
(logits, target) module: the `ib` / `ib_focal` methods (methods/ib.py) call this function in
their training step after the switch epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def influence_balanced_loss(logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor, *,
                            alpha: float = 1000.0, epsilon: float = 1e-3, gamma: float = 0.0,
                            class_weight: torch.Tensor | None = None, detach: bool = False) -> torch.Tensor:
    """IB loss (official `IBLoss`) and, with gamma > 0, IB-focal (`IB_FocalLoss`).

    With p = softmax(z_i), y the one-hot target, h_i the pooled feature vector and w the
    per-class weight:

        influence_i = ||p - y||_1 * ||h_i||_1                 (the paper's influence: ||dCE/dz||_1 ||h||_1)
        ib_i        = alpha / (influence_i + epsilon)
        l_i         = w_{y_i} * CE(z_i, y_i)                  (F.cross_entropy, weight, reduction none)
        IB:          loss = (1/B) sum_i l_i * ib_i
        IB-focal:    loss = (1/B) sum_i (1 - exp(-l_i))^gamma * l_i * ib_i

    Readings (official code, kept): the batch is reduced by a plain mean over B (not divided by
    sum_i w_{y_i}); in IB-focal the "probability" exp(-l_i) is taken from the *weighted* CE, so
    with a class weight it is p_y^{w_y}, not p_y (as LDAM-DRW's focal loss); the influence
    factor is **not detached**: the gradient flows through ||p - y||_1 and through ||h||_1
    (`detach=True` holds it fixed, the reading of the paper's Algorithm 1, where the factor is
    a per-sample weight). ||h||_1 is the sum of |h| of the pooled features (the official
    ResNet-32 returns `torch.sum(torch.abs(out1), 1)` of the post-ReLU average pool).

    gamma = 0 makes IB-focal exactly IB. The influence is computed in float32 (bf16 autocast).

    Shapes: logits (B, C), target (B,) int64, features (B, D), class_weight (C,) or None ->
    scalar.
    """
    work = torch.promote_types(logits.dtype, torch.float32)
    z, h = logits.to(work), features.to(work)
    onehot = F.one_hot(target, z.shape[1]).to(work)
    grad_norm = (torch.softmax(z, dim=1) - onehot).abs().sum(1)  # (B,) ||p - y||_1
    feat_norm = h.abs().sum(1)  # (B,) ||h||_1
    influence = grad_norm * feat_norm
    if detach:
        influence = influence.detach()
    ib = alpha / (influence + epsilon)
    weight = None if class_weight is None else class_weight.to(device=z.device, dtype=work)
    ce = F.cross_entropy(z, target, weight=weight, reduction="none")  # w_y * CE
    if gamma:
        ce = (1.0 - torch.exp(-ce)).pow(gamma) * ce
    return (ce * ib).mean()
