"""Cyclical focal loss (Smith, "Cyclical Focal Loss", arXiv 2202.08978, 2022), as the official
`Cyclical_FocalLoss` (lnsmith54/CFL, TIMM/timm/loss/asl_focal_loss.py, commit
3362650cc536247292576026d5940b50d23bc02a)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import integer, number
from .base import Loss


def cyclical_xi(epoch: int, epochs: int, factor: float) -> float:
    """The official schedule of the mixing weight xi (the code's `eta`) at 0-idx `epoch` of `epochs`.

        xi = 1 - f e / (E - 1)                     while f e < E
        xi = 0                                     after that, when f = 1
        xi = (f e / (E - 1) - 1) / (f - 1)         after that, when f > 1

    So xi falls linearly from 1 (epoch 0) to about 0 at epoch E / f and, for f > 1, rises
    back to 1 at the last epoch E - 1 (f = 2 is the symmetric "cyclical" shape, f = 1 the
    "modified" one; the README's CIFAR / ImageNet runs use f = 4). The official denominators are
    E - 1 while the branch test uses E (kept, so xi can dip a hair below 0 for non-integer f).
    E = 1 (a one-epoch run, where E - 1 = 0) gives xi = 1.
    """
    if epochs <= 1:
        return 1.0
    if factor * epoch < epochs:
        return 1.0 - factor * epoch / (epochs - 1)
    if factor == 1.0:
        return 0.0
    return (factor * epoch / (epochs - 1) - 1.0) / (factor - 1.0)


@LOSSES.register("cyclical_focal")
class CyclicalFocalLoss(Loss):
    """Cyclical focal loss (Smith 2022), the official `Cyclical_FocalLoss` with its epoch schedule.

    With p = softmax(z_i), q the label-smoothed target (1 - eps) onehot + eps / C and xi the
    epoch's mixing weight (`cyclical_xi`):

        a_ij = (1 - p_ij)^gamma_pos  for j = y_i,   p_ij^gamma_neg  otherwise   (asymmetric focal)
        b_ij = (1 + p_ij)^gamma_hc   for j = y_i,   1               otherwise   (high-confidence)
        l_i  = - sum_j q_ij [(1 - xi) a_ij + xi b_ij] log p_ij
        loss = (1/B) sum_i l_i      (with a class weight w: sum_i w_{y_i} l_i / sum_i w_{y_i})

    Readings (official code): label smoothing eps = 0.1 (the class default, never set by the
    training script) also smooths the non-target terms, which carry the p_j^gamma_neg factor;
    the modulating factors are not detached (gradient flows through them); xi changes once
    per epoch. Defaults are the README's CIFAR command (gamma_pos 2, gamma_neg 2, gamma_hc 3,
    cyclical_factor 4). The official code has no class weight; here RW / DRW weights (the
    `reweight` section) give PyTorch's weighted mean, as `ce`.

    `epochs` is the length E of the schedule: left unset, the training run sets it to its
    `train.epochs` (Method.build_loss, through the class attribute `follows_train_epochs`), so
    `train.epochs=...` overrides keep the schedule whole. timm's script passes its
    `num_epochs`, which includes the cool-down epochs (200 + 1 for the README command); set
    `epochs` explicitly to reproduce that. xi is recomputed from the 0-idx epoch at every epoch
    start (`on_epoch_start`), so --resume and branching give the same xi; before the first
    `on_epoch_start` it is xi(0) = 1.

    gamma_pos = gamma_neg = gamma_hc = 0 with label_smoothing = 0 is exactly F.cross_entropy
    at every epoch (a = b = 1).

    Shapes: logits (B, C), target (B,) int64 -> scalar.
    """

    neutral_params = {"gamma_pos": 0.0, "gamma_neg": 0.0, "gamma_hc": 0.0, "label_smoothing": 0.0}
    follows_train_epochs = True  # Method.build_loss passes epochs = train.epochs unless loss.params sets it

    def __init__(self, *, class_counts, gamma_pos: float = 2.0, gamma_neg: float = 2.0, gamma_hc: float = 3.0,
                 factor: float = 4.0, label_smoothing: float = 0.1, epochs: int | None = None):
        super().__init__(class_counts=class_counts)
        self.gamma_pos = number("gamma_pos", gamma_pos, low=0)
        self.gamma_neg = number("gamma_neg", gamma_neg, low=0)
        self.gamma_hc = number("gamma_hc", gamma_hc, low=0)
        self.factor = number("factor", factor, low=1)
        self.label_smoothing = number("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
        self.epochs = None if epochs is None else integer("epochs", epochs, low=1)
        self.epoch = 0
        self.xi = 1.0

    def on_epoch_start(self, epoch: int) -> None:
        if self.epochs is None:
            raise ValueError("cyclical_focal needs epochs (the schedule length); a training run sets it to "
                             "train.epochs")
        self.epoch = int(epoch)
        self.xi = cyclical_xi(self.epoch, self.epochs, self.factor)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        is_target = F.one_hot(target, num_classes).bool()
        a = torch.where(is_target, (1.0 - p).pow(self.gamma_pos), p.pow(self.gamma_neg))
        b = torch.where(is_target, (1.0 + p).pow(self.gamma_hc), torch.ones_like(p))
        modulated = ((1.0 - self.xi) * a + self.xi * b) * log_p
        eps = self.label_smoothing
        q = is_target.to(log_p.dtype) * (1.0 - eps) + eps / num_classes
        per_sample = -(q * modulated).sum(1)  # (B,)
        if self.class_weight is None:
            return per_sample.mean()
        w = self.class_weight.to(logits.dtype)[target]
        return (w * per_sample).sum() / w.sum()
