"""TDE: de-confounded training with a causal-norm head, counterfactual inference (Tang, Huang,
Zhang, "Long-Tailed Classification by Keeping the Good and Removing the Bad Momentum Causal
Effect", NeurIPS 2020).

Official code read: KaihuaTang/Long-Tailed-Recognition.pytorch, commit
5c916d0d0fd5e1fa984621b86f15cda2bc69df17 (`classification/models/CausalNormClassifier.py`,
`classification/run_networks.py`, `classification/config/CIFAR10_LT/causal_norm_32.yaml`).

The recipe: the configured backbone with its classifier replaced by the causal-norm head
(models/causal_norm.py: multi-head normalised logits, paper Eq. 6, and the moving feature
direction d updated in training mode), trained with the configured loss (the official uses
plain softmax cross-entropy); in eval mode the head returns the TDE logits (paper Eq. 7-8) with
its `alpha` buffer, so `longtail eval`, `predict` and export all predict with TDE.

Parameters (keyword-only): num_head (2), tau (16), gamma (1/32), mu (0.9), alpha (3.0, the
official constructor's default and its ImageNet-LT / Places-LT value; the official CIFAR-10-LT
config uses 1.0, CIFAR-100-LT 1.5); mu_schedule 'fixed' (official for CIFAR: mu constant) or 'lr'
(official for every other dataset: mu_e = 1 - (1 - mu) * min(50 * lr_e, 1), with lr_e the epoch's
learning rate); alpha_select 'none' or 'val': after every epoch's steps the alpha of `alpha_grid`
with the best validation top-1 (ties: the earlier grid entry) is written into the head, before
that epoch's validation and checkpoint, so every checkpoint (last.pt, best_val.pt) carries the
alpha it predicts with; the choice and the grid's validation accuracies are method state
(`checkpoint["method"]`). Never chosen on the test split. The official picks alpha by hand (its
README: test several alphas, or make alpha * mean cos about 1).

Differences from the official code, and why: the backbone is the project's (ResNet-32 of LDAM-DRW,
64-d features, so 32-d heads) where the official CIFAR config uses BBN's ResNet-32 (128-d); the
warm-up follows the project's schedule (lr * e / W) instead of WarmupMultiStepLR's linear ramp
from lr / 3; under torchrun d is updated from the global batch mean (equal on every rank).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..dist import context
from ..eval.predict import predict
from ..models import Classifier
from ..models.causal_norm import DEFAULTS, CausalNormHead, check_causal_norm_params
from ..optim import learning_rate
from ..registry import METHODS
from .base import Method

log = logging.getLogger(__name__)

MU_SCHEDULES = ("fixed", "lr")
ALPHA_SELECT = ("none", "val")
DEFAULT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


@METHODS.register("tde")
class TDE(Method):
    """Causal-norm head trained with the configured loss; TDE logits in eval mode."""

    rebalancing = True  # TDE's prediction already removes the head-class bias (inference.py)

    def __init__(self, *, cfg, data, num_head: int = DEFAULTS["num_head"], tau: float = DEFAULTS["tau"],
                 gamma: float = DEFAULTS["gamma"], mu: float = DEFAULTS["mu"], alpha: float = DEFAULTS["alpha"],
                 mu_schedule: str = "fixed", alpha_select: str = "none", alpha_grid=DEFAULT_GRID):
        super().__init__(cfg=cfg, data=data)
        check_causal_norm_params(num_head=num_head, tau=tau, gamma=gamma, mu=mu, alpha=alpha)
        if mu_schedule not in MU_SCHEDULES:
            raise ValueError(f"mu_schedule must be one of {', '.join(MU_SCHEDULES)}, got {mu_schedule!r}")
        if alpha_select not in ALPHA_SELECT:
            raise ValueError(f"alpha_select must be one of {', '.join(ALPHA_SELECT)}, got {alpha_select!r}")
        grid = list(alpha_grid) if isinstance(alpha_grid, (list, tuple)) else None
        if not grid or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0 for a in grid):
            raise ValueError(f"alpha_grid must be a non-empty list of numbers >= 0, got {alpha_grid!r}")
        if alpha_select == "val" and hasattr(data, "train") and (data.val is None or not len(data.val)):
            raise ValueError("alpha_select 'val' needs a validation split (set data.val_per_class > 0)")
        self.head_params = {"num_head": num_head, "tau": float(tau), "gamma": float(gamma), "mu": float(mu),
                            "alpha": float(alpha)}
        self.mu_schedule, self.alpha_select = mu_schedule, alpha_select
        self.alpha_grid = [float(a) for a in grid]
        self.mu_now = float(mu)
        self.selection: dict = {}  # alpha chosen on the validation split, with the grid's val top-1

    def build_model(self) -> Classifier:
        if self.cfg.model.head not in ("linear", "causal_norm"):
            raise ValueError(f"method 'tde' builds its own causal-norm head: model.head must be linear or "
                             f"causal_norm, got '{self.cfg.model.head}'")
        model = super().build_model()
        model.reset_head(CausalNormHead(in_features=model.num_features, num_classes=self.data.num_classes,
                                        **self.head_params))
        return model

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        mu = self.head_params["mu"]
        if self.mu_schedule == "lr":  # run_networks.py: mu = 1 - (1 - 0.9) * min(lr * 50, 1), not for CIFAR
            t = self.cfg.train
            lr = learning_rate(epoch, base_lr=t.lr, epochs=t.epochs, schedule=t.lr_schedule,
                               warmup_epochs=t.warmup_epochs, milestones=t.milestones, decay=t.lr_decay,
                               min_lr=t.min_lr)
            mu = 1.0 - (1.0 - mu) * min(lr * 50.0, 1.0)
        self.mu_now = mu

    def set_train_mode(self, model: Classifier) -> None:
        super().set_train_mode(model)
        model.head.mu = self.mu_now

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        super().on_epoch_end(epoch, model, device)
        if self.alpha_select == "val":
            self.select_alpha(model, device, epoch=epoch)

    @torch.no_grad()
    def select_alpha(self, model: Classifier, device, *, epoch: int | None = None) -> float:
        """Write the grid's best alpha on the validation split into the head; returns it."""
        t = self.cfg.train
        out = predict(model, self.data.val, mean=self.data.mean, std=self.data.std, batch_size=t.eval_batch_size,
                      device=device, features=True, channels_last=t.channels_last)
        head: CausalNormHead = model.head
        features = torch.from_numpy(out["features"]).to(head.direction.device)
        labels = torch.from_numpy(out["labels"]).to(features.device)
        scores = [float((head.logits(features, a).argmax(1) == labels).double().mean()) * 100.0
                  for a in self.alpha_grid]
        best = int(np.argmax(scores))  # the first of equal scores
        head.alpha.fill_(self.alpha_grid[best])
        self.selection = {"alpha": self.alpha_grid[best], "epoch": None if epoch is None else epoch + 1,
                          "grid": list(self.alpha_grid), "val_top1": scores}
        if context().is_main:
            log.info("tde: alpha %g chosen on the validation split (val top-1 %.2f; grid %s)", self.alpha_grid[best],
                     scores[best], ", ".join(f"{a:g}: {s:.2f}" for a, s in zip(self.alpha_grid, scores)))
        return self.alpha_grid[best]

    def state_dict(self) -> dict:
        return {"selection": dict(self.selection)} if self.selection else {}

    def load_state_dict(self, state: dict) -> None:
        self.selection = dict(state.get("selection", {}) or {})
