"""MetaSAug: meta semantic augmentation (Li, Gong, Liu, Wang, Qiao, Cheng, CVPR 2021).

ISDA (methods/isda.py) whose class covariances are corrected, every step, by one meta-gradient
step on a small balanced meta set, as the official `MetaSAug_LDAM_train.py`
(github.com/BIT-DA/MetaSAug, commit 9efe54a): for a training batch (x, y) and a meta batch
(x_m, y_m) drawn from the **validation split** (data.val_per_class; never the test set),

    theta'(Sigma) = theta - eta * grad_theta L_train(theta, Sigma)          (one SGD step, no momentum)
    Sigma_hat     = Sigma - meta_lr * grad_Sigma CE(f(x_m; theta'(Sigma)), y_m)
    loss          = L_train(theta, Sigma_hat)                               (what the optimiser minimises)

L_train is the configured loss on ISDA's augmented logits z + lam/2 (w_j - w_y)^T Sigma_y (w_j - w_y)
(`isda_logits`; lam = lambda0 * epoch / train.epochs), the meta loss plain unweighted CE on the
stepped network's logits of the meta batch. theta' is a functional copy: `torch.func.functional_call`
over the model's trainable parameters and cloned buffers (BatchNorm in train mode, as the
official fresh `meta_model`, whose running statistics are thrown away), second-order gradients
through the inner step (`create_graph=True`). eta (the inner learning rate) is the run's learning
rate of the epoch. Sigma is the ISDA estimator's (`LazyCovariance`) online class covariance;
Sigma_hat is used for this step's loss only and never written back (official: `new_cv` is local,
`update_cv` is never called), so the method's state is the estimator alone (no meta optimiser).

Shapes: images (B, 3, H, W), target (B,), meta images (M, 3, H, W), Sigma (C, D, D) (or the
diagonal (C, D)), head weight (C, D); only the rows Sigma_y of classes in the batch get a meta
gradient.

Official quirks kept (docs/methods.md, "MetaSAug"):
* before `start_epoch` (official 160 of 200) training is plain unweighted CE (`train()` uses
  F.cross_entropy whatever the loss), no augmentation and no covariance estimate: the estimator
  starts empty at `start_epoch` (`pre_start_loss: configured` uses the configured loss instead);
* the covariance used in a step is the estimate **before** this batch (official order: augment,
  then `update_CV`); ISDA updates first (`covariance_update: before_loss` gives ISDA's order);
* the meta batch is one random batch of `meta_batch_size` (official 100, the training batch size)
  validation images per step (`next(iter(validation_loader))` with shuffling), augmented as the
  training images (official meta set uses the training transform);
* official LDAM_meta subtracts the margin from unscaled logits (its `s = 30` is stored, never
  used): `loss: ldam` with `s: 1` on the linear head reproduces it; the DRW weights (effective
  number, beta 0.9999, from epoch 160) weight both the inner and the final loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..data.augment import BatchAugment
from ..data.samplers import stream_seed
from ..dist import autocast_dtype
from ..errors import ConfigError
from ..losses._checks import choice, integer, number
from ..models import Classifier
from ..optim import learning_rate
from ..registry import METHODS
from .base import StepResult, loop_augment, refuse_batch_mixing
from .isda import ISDA, isda_logits

OFFICIAL_START = 160 / 200  # the official switch to MetaSAug: epoch 160 of 200
COVARIANCE_UPDATES = ("after_loss", "before_loss")
PRE_START_LOSSES = ("ce", "configured")
_STREAM = 0x3E7A5A06  # the meta batches' own random stream, apart from the loop's augmentation


def meta_covariance_step(model: Classifier, images: torch.Tensor, target: torch.Tensor,
                         meta_images: torch.Tensor, meta_target: torch.Tensor, cov: torch.Tensor, *, loss,
                         lam: float, inner_lr: float, meta_lr: float,
                         autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sigma_hat, meta loss): Sigma - meta_lr * d CE(f(x_m; theta - inner_lr grad L_train), y_m) / d Sigma.

    `model` is left untouched (parameters, gradients, BatchNorm running statistics): the copy is
    functional. `loss(logits, target)` is L_train's loss on the augmented logits; `cov` (C, D, D) or
    (C, D) is treated as a constant input. Both outputs are detached.
    """
    named = dict(model.named_parameters())
    params = {n: p for n, p in named.items() if p.requires_grad}
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # the copy's BN statistics, thrown away
    head_weight = f"{model.head_name}.weight"
    if head_weight not in params:
        raise ValueError(f"the head weight '{head_weight}' must be a trainable parameter")
    sigma = cov.detach().clone().requires_grad_(True)

    def logits_of(weights: dict, batch: torch.Tensor) -> torch.Tensor:
        with _autocast(batch.device, autocast_dtype):
            out = functional_call(model, (weights, frozen, buffers), (batch,))
        return out.float() if autocast_dtype is not None else out

    augmented = isda_logits(logits_of(params, images), params[head_weight], target, sigma, lam, detach_cov=False)
    inner = loss(augmented, target)
    names = list(params)
    grads = torch.autograd.grad(inner, [params[n] for n in names], create_graph=True, allow_unused=True)
    stepped = {n: params[n] if g is None else params[n] - inner_lr * g for n, g in zip(names, grads)}
    meta_loss = F.cross_entropy(logits_of(stepped, meta_images), meta_target)
    (grad_sigma,) = torch.autograd.grad(meta_loss, sigma)
    return (cov - meta_lr * grad_sigma).detach(), meta_loss.detach()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@METHODS.register("metasaug")
class MetaSAug(ISDA):
    """MetaSAug on a linear head: ISDA with a meta-learned covariance (module docstring).

    Parameters (method.params):
        lambda0: ISDA's strength, lam = lambda0 * epoch / train.epochs (official script 0.75).
        meta_lr: step size of the covariance's meta-gradient step (official 0.1); 0 leaves Sigma
            as estimated (ISDA with the official order and start).
        start_epoch: 0-idx epoch where MetaSAug starts; None: round(0.8 * train.epochs) (160 of 200).
        meta_batch_size: validation images per meta batch (official 100); at most the split's size.
        inner_lr: the inner SGD step's learning rate; None: the run's learning rate of the epoch.
        covariance_update: 'after_loss' (official) or 'before_loss' (ISDA's order).
        pre_start_loss: 'ce' (official: plain unweighted CE before start_epoch) or 'configured'.
        diagonal: diagonal covariances (as ISDA's option).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "ISDA covariance update: a Python loop over the batch's classes (torch.unique, boolean selection, the seen count read as a float); a vectorised update would round differently",
        "MetaSAug: the meta batch's positions drawn on the host (numpy) every step",
    )

    def __init__(self, *, cfg, data, lambda0: float = 0.75, meta_lr: float = 0.1, start_epoch: int | None = None,
                 meta_batch_size: int = 100, inner_lr: float | None = None, covariance_update: str = "after_loss",
                 pre_start_loss: str = "ce", diagonal: bool = False):
        super().__init__(cfg=cfg, data=data, lambda0=lambda0, diagonal=diagonal)
        self.autocast = autocast_dtype(cfg.train)  # resolved once, not every step
        self.meta_lr = number("meta_lr", meta_lr, low=0)
        self.start_epoch = integer("start_epoch", round(OFFICIAL_START * cfg.train.epochs) if start_epoch is None
                                   else start_epoch, low=0)
        self.meta_batch_size = integer("meta_batch_size", meta_batch_size, low=1)
        self.inner_lr = None if inner_lr is None else number("inner_lr", inner_lr, low=0)
        self.covariance_update = choice("covariance_update", covariance_update, COVARIANCE_UPDATES)
        self.pre_start_loss = choice("pre_start_loss", pre_start_loss, PRE_START_LOSSES)
        refuse_batch_mixing(cfg, "metasaug", "MetaSAug's meta step needs unmixed batches")
        # a DataInfo (rebuilding a trained run's network) carries no splits: nothing to check then
        if hasattr(data, "val") and (data.val is None or not len(data.val)):
            raise ConfigError("method 'metasaug' takes its meta set from the validation split: set "
                              "data.val_per_class (e.g. data.val_per_class=10)")
        self._inner_lr_now = 0.0
        self._augment: BatchAugment | None = None

    def build_loss(self):
        loss = super().build_loss()
        if callable(getattr(loss, "sync_statistics", None)):
            raise ValueError("it counts statistics at every call; MetaSAug calls its loss twice per step (inner "
                             "and final): choose a loss without per-call statistics")
        return loss

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)  # RW / DRW weights, lam
        t = self.cfg.train
        self._inner_lr_now = self.inner_lr if self.inner_lr is not None else learning_rate(
            epoch, base_lr=t.lr, epochs=t.epochs, schedule=t.lr_schedule, warmup_epochs=t.warmup_epochs,
            milestones=t.milestones, decay=t.lr_decay, min_lr=t.min_lr)

    def meta_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random meta batch (M, C, H, W), (M,) of the validation split for the current
        (seed, epoch, step), augmented as the training batches; the same on every process."""
        val = self.data.val
        g = torch.Generator().manual_seed(stream_seed(self.cfg.train.seed, self._epoch, self._step, _STREAM))
        pos = torch.randperm(len(val), generator=g)[:self.meta_batch_size].numpy()
        if self._augment is None:
            self._augment = loop_augment(self.cfg, self.data, device)
        images = self._augment(torch.from_numpy(val.batch(pos)).to(device), g)
        return images, torch.from_numpy(val.labels[pos]).to(device)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        epoch, _, _ = self.step_position(images)  # self._step is now 1-based: the meta batch's seed
        if epoch < self.start_epoch:
            logits = forward(images)[1]
            value = F.cross_entropy(logits, target) if self.pre_start_loss == "ce" else loss(logits, target)
            return StepResult(value, logits, target)
        features, logits = forward(images)
        num_classes = logits.shape[1]
        if self.covariance_update == "before_loss":
            cov = self.covariance.update(features, target, num_classes)
        else:
            cov = self.covariance.current(num_classes, features.shape[1], features.device).to(features.dtype)
        meta_images, meta_target = self.meta_batch(images.device)
        cov, _ = meta_covariance_step(model, images, target, meta_images, meta_target, cov, loss=loss, lam=self.lam,
                                      inner_lr=self._inner_lr_now, meta_lr=self.meta_lr, autocast_dtype=self.autocast)
        if self.covariance_update == "after_loss":
            self.covariance.update(features, target, num_classes)
        return StepResult(loss(isda_logits(logits, model.head.weight, target, cov.to(logits.dtype), self.lam),
                               target), logits, target)

    def plain_ce_epochs(self) -> float:
        """Plain unweighted CE before start_epoch (pre_start_loss 'ce')."""
        return self.start_epoch if self.pre_start_loss == "ce" else 0
