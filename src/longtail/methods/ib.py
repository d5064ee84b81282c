"""IB and IB-focal: influence-balanced training (Park et al., "Influence-Balanced Loss for
Imbalanced Visual Classification", ICCV 2021; official code pseulki/IB-Loss, commit
b29b8b005f614292e9ae8b43903a6f7df8ef09a6, `cifar_train.py` and `losses.py`).

Two phases, as `cifar_train.py`:

1. normal training: the configured loss (the official: unweighted `ce`) on the logits, for
   0-idx epochs < `start_epoch` (official `--start_ib_epoch 100` of 200 on CIFAR);
2. balancing training: from epoch `start_epoch` on, the influence-balanced loss
   (losses/ib.py `influence_balanced_loss`) of the logits, the labels and the pooled
   features of the same forward pass, with per-class weights `class_weight`
   (official `--train_rule IBReweight`: w_c = (1/n_c) / sum_k (1/n_k) * C), alpha 1000,
   epsilon 0.001; `ib_focal` adds the focal factor with gamma = 1 (`--loss_type IBFocal`).

The official script also lowers the learning rate at the switch: from the switch on it is
0.01 x the base LR, 1e-4 x after epoch 160 and 1e-6 x after 180 (instead of CE's 1e-2 / 1e-4):
a step schedule with milestones [start_epoch, 160, 180] and decay 0.01. That is the config's
`train.milestones` (configs/cifar10_lt*/ib.yaml), not part of the method; a branch off a CE
run is still allowed, since the LR of every epoch before the branch point is the same
(engine/branch.py).

Prediction is the argmax of the plain logits (the official validation), so nothing changes at
test time. The method has no state: the phase follows from the epoch at each epoch start, so
--resume and branching are exact.
"""

from __future__ import annotations

import torch

from ..losses import effective_number_weights, inverse_frequency_weights
from ..losses._checks import choice, number
from ..losses.ib import influence_balanced_loss
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing

CLASS_WEIGHTS = ("inverse_frequency", "effective_number", "none")


@METHODS.register("ib")
class InfluenceBalanced(Method):
    """IB loss (Park et al., ICCV 2021): the configured loss, then the influence-balanced loss.

    Parameters (method.params):
        start_epoch: 0-idx epoch at which the IB loss replaces the configured loss (official
            `start_ib_epoch`, 100 of 200); None: the first step-LR milestone.
        alpha: numerator of the influence weight (official script: 1000; the class default
            there is 10000).
        epsilon: added to the influence (official: 0.001, hard-coded).
        gamma: focal exponent; 0 is IB (`IBLoss`), > 0 IB-focal (`IB_FocalLoss`).
        class_weight: 'inverse_frequency' (`IBReweight`, default), 'effective_number'
            (`CBReweight`, with beta) or 'none'.
        beta: effective-number beta (official `CBReweight`: 0.9999).
        detach: False (official): the gradient flows through the influence factor; True holds
            it fixed (a per-sample weight, the paper's reading).
    """

    default_gamma = 0.0

    def __init__(self, *, cfg, data, start_epoch: int | None = None, alpha: float = 1000.0, epsilon: float = 1e-3,
                 gamma: float | None = None, class_weight: str = "inverse_frequency", beta: float = 0.9999,
                 detach: bool = False):
        super().__init__(cfg=cfg, data=data)
        t, name = cfg.train, cfg.method.name
        if start_epoch is None:
            if t.lr_schedule != "step" or not t.milestones:
                raise ValueError(f"method '{name}' needs start_epoch (no step LR milestone to default to)")
            start_epoch = int(t.milestones[0])
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or not 0 <= start_epoch < t.epochs:
            raise ValueError(f"start_epoch must be an integer in [0, train.epochs = {t.epochs}), got {start_epoch!r}")
        refuse_batch_mixing(cfg, name, "the IB loss takes one label per image")
        self.start_epoch = start_epoch
        self.alpha = number("alpha", alpha, low=0, low_open=True)
        self.epsilon = number("epsilon", epsilon, low=0, low_open=True)
        self.gamma = number("gamma", self.default_gamma if gamma is None else gamma, low=0)
        self.class_weight = choice("class_weight", class_weight, CLASS_WEIGHTS)
        self.beta = number("beta", beta, low=0, high=1, high_open=True)
        if not isinstance(detach, bool):
            raise ValueError(f"detach must be true or false, got {detach!r}")
        self.detach = detach
        self.ib_weight = self._weights()
        self.active = False

    def _weights(self) -> torch.Tensor | None:
        counts = self.data.class_counts
        if self.class_weight == "inverse_frequency":
            return inverse_frequency_weights(counts)
        if self.class_weight == "effective_number":
            return effective_number_weights(counts, self.beta)
        return None

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)  # the configured loss's RW / DRW and epoch hooks (phase 1)
        self.active = epoch >= self.start_epoch

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        if not self.active:
            return super().training_step(model, forward, images, target, loss, generator)
        features, logits = forward(images)
        value = influence_balanced_loss(logits, target, features, alpha=self.alpha, epsilon=self.epsilon,
                                        gamma=self.gamma, class_weight=self.ib_weight, detach=self.detach)
        return StepResult(value, logits, target)

    def plain_ce_epochs(self) -> float:
        """Plain CE before `start_epoch` when the configured loss is unweighted `ce`."""
        c = self.cfg
        if c.loss.name != "ce" or c.loss.params:
            return 0
        return min(self.start_epoch, self._unweighted_epochs())


@METHODS.register("ib_focal")
class InfluenceBalancedFocal(InfluenceBalanced):
    """IB-focal loss (Park et al., ICCV 2021): IB with the focal factor, gamma = 1 by default."""

    default_gamma = 1.0
