"""CDB-W-CE: class-wise difficulty-based weights from the validation split (Sinha, Ohashi and
Nakamura, ACCV 2020 "Class-Wise Difficulty-Balanced Loss"; IJCV 2022 "Class-Difficulty Based
Methods for Long-Tailed Visual Recognition", CDB-W loss).

As the official CIFAR-LT training (github.com/hitachi-rd-cv/CDB-loss, commit
82b0119e189a50beb3ae581d401dd8585739c112, `CIFAR-LT/cifar_train.py`): after every epoch the
model is evaluated on the validation split (never the test split), the per-class accuracy A_c
gives the difficulty d_c = 1 - A_c, and the loss of the *next* epoch is re-weighted with
w_c = d_c^tau / sum_k d_k^tau * C (losses/cdb.py, `cdb_weights`; tau 'dynamic' by default).
Epoch 0, before any measurement, trains with d = 1 for every class, i.e. uniform weights: plain
cross-entropy (official: `CDB_loss(class_difficulty=np.ones(C))`).

Readings chosen:

* A_c = correct_c / n_c over the validation images of class c (official: correct_c / 25, its
  validation split holding 25 images of every class). A class without validation images gets
  the mean accuracy of the others (the official code has no such case).
* The weights go to the configured loss through `set_class_weight`; the official CIFAR-LT loss
  is `cdb_ce` (batch-mean reduction). `reweight` must stay 'none': this method sets the weights.
* The evaluation runs on every rank of a torchrun job (all ranks hold the same weights, so they
  measure the same accuracies and set the same weights); it uses the model in eval mode
  without autocast, as validation does.
* The official model's linear bias is initialised to -log((1 - 1/C) / (1/C)) for every class; a
  constant shift of all logits changes no softmax, so it is not reproduced.

The measured accuracies and the weights are method state (checkpoints; --resume is exact).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ConfigError
from ..eval.predict import predict
from ..losses import Loss
from ..losses._checks import choice
from ..losses.cdb import DYNAMIC_TAU, cdb_tau, cdb_weights, check_tau
from ..models import Classifier
from ..registry import METHODS
from .base import Method

log = logging.getLogger(__name__)


def class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class top-1 accuracy in [0, 1], float64 (C,), of logits (N, C) and labels (N,).
    A class with no sample gets the mean accuracy of the classes that have samples."""
    labels = np.asarray(labels, dtype=np.int64)
    correct = (np.asarray(logits).argmax(1) == labels).astype(np.float64)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)[:num_classes]
    counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    seen = counts > 0
    acc = np.zeros(num_classes, dtype=np.float64)
    acc[seen] = hits[seen] / counts[seen]
    acc[~seen] = acc[seen].mean() if seen.any() else 0.0
    return acc


@METHODS.register("cdb_ce")
class CDBWeighting(Method):
    """Class-difficulty-based weights, measured on the validation split after each epoch."""

    rebalancing = True

    def __init__(self, *, cfg, data, tau="dynamic", dynamic_tau: str = "sigmoid"):
        super().__init__(cfg=cfg, data=data)
        self.tau = check_tau(tau)
        self.dynamic_tau = choice("dynamic_tau", dynamic_tau, DYNAMIC_TAU)
        if cfg.reweight.scheme != "none":
            raise ValueError(f"method 'cdb_ce' sets the class weights itself: leave reweight.scheme at 'none' "
                             f"(got {cfg.reweight.scheme!r})")
        # a DataInfo (rebuilding a trained run's network) carries no splits: nothing to check then
        if hasattr(data, "val") and (data.val is None or not len(data.val)):
            raise ConfigError("method 'cdb_ce' measures class difficulty on a validation split: set "
                              "data.val_per_class (e.g. data.val_per_class=20)")
        self.class_weight: torch.Tensor | None = None  # (C,) for the next epoch; None = uniform
        self.class_accuracy: torch.Tensor | None = None  # (C,) float64, the last measurement

    def on_epoch_start(self, epoch: int, loss: Loss) -> None:
        loss.set_class_weight(self.class_weight)
        hook = getattr(loss, "on_epoch_start", None)
        if callable(hook):
            hook(epoch)

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        super().on_epoch_end(epoch, model, device)  # a configured weight constraint projects first
        t, data = self.cfg.train, self.data
        out = predict(model, data.val, mean=data.mean, std=data.std, batch_size=t.eval_batch_size, device=device,
                      channels_last=t.channels_last)
        self.set_accuracy(class_accuracy(out["logits"], out["labels"], data.num_classes))
        log.debug("cdb_ce after epoch %d: tau %.4f, weights %s", epoch + 1, self.last_tau(),
                  np.round(self.class_weight.numpy(), 4).tolist())

    def set_accuracy(self, accuracy) -> None:
        """Weights for the next epoch from per-class accuracies (C,) in [0, 1]."""
        self.class_accuracy = torch.as_tensor(np.asarray(accuracy, dtype=np.float64))
        self.class_weight = cdb_weights(1.0 - self.class_accuracy.numpy(), tau=self.tau, dynamic=self.dynamic_tau)

    def last_tau(self) -> float:
        if self.class_accuracy is None:
            return float("nan")
        return cdb_tau(1.0 - self.class_accuracy.numpy(), tau=self.tau, dynamic=self.dynamic_tau)

    def plain_ce_epochs(self) -> float:
        """Epoch 0 is uniform-weighted: plain CE with `ce` or `cdb_ce` (no mixup)."""
        c = self.cfg
        if c.loss.name not in ("ce", "cdb_ce") or c.train.mixup_alpha > 0:
            return 0
        return 1

    def state_dict(self) -> dict:
        if self.class_accuracy is None:
            return {}
        return {"class_accuracy": self.class_accuracy.clone(), "class_weight": self.class_weight.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.class_accuracy = state["class_accuracy"].to(torch.float64).cpu()
            self.class_weight = state["class_weight"].to(torch.float32).cpu()
