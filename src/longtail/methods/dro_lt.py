"""DRO-LT: distributional robustness loss for long-tail learning (Samuel & Chechik, ICCV 2021).

As the official code, dvirsamuel/DRO-LT (commit 1960518d, `main.py`, `losses.py`), whose
CIFAR-LT recipe has three parts; here each is a run:

1. a plain CE model (the library's `ce` run: LDAM-DRW's CIFAR schedule, 200 epochs);
2. ``dro_lt`` (stage 2 from the CE checkpoint, `method.params.stage1`): the feature extractor
   trains, the classifier is frozen (requires_grad False), with
   L = CE_w(logits, y) + weight * L_robust(features, y), CE_w weighted by n_c / n_max (the
   official "ce_lt"), weight 1 (the losses are summed), class-aware batches (4 per class), a
   constant lr (feat_lr 0.005), and the learnable per-class epsilons (initialised to 1,
   `torch.ones(C)`; in the feature optimiser, same lr and weight decay);
3. ``dro_lt_classifier`` (stage 2 from the ``dro_lt`` checkpoint): the feature extractor frozen
   in eval mode, the same classifier (not re-initialised) trained with plain CE, class-aware
   batches, constant lr (cls_lr 0.01): the official's last `balanced_clf_nepochs` = 20 epochs.

L_robust (losses/feature.py `dro_loss`) compares the batch features with the class centroids
mu_c: the per-class means of the training set's features in eval mode, recomputed before every
epoch (the official `validate(feat_train_loader)` at each epoch start). Here they are computed
before the first step and after every epoch's steps (= before the next epoch, same weights),
kept in the loss module with the epsilons, so checkpoints hold them (resume-exact) and every
rank computes the same ones from the same weights; the epsilons' gradient is averaged over
ranks like the model's.

Differences from the official code, each for a reason:
- the centroids come from the un-augmented training images (the official passes the
  augmented, class-aware-resampled loader with AutoAugment + Cutout through the eval-mode
  network; our augmentation is batched inside the loop);
- stage 3 starts from the last stage-2 weights; the official reloads the stage-2 epoch with the
  best nearest-centroid accuracy on the *test* set (numbers are never selected on test here);
- an epoch has N (training-set size) class-aware samples; the official sampler's epoch has
  n_max * C (4x longer on CIFAR-10-LT ratio 100);
- the official's epsilon assignment (`pairwise[mask] = a[mask] - eps[batch_targets]`) pairs
  the positives in class order with epsilons in batch order: kept as default
  (`epsilon_order: official`); `per_sample` gives each sample its own class's epsilon;
- the official's softmax is over the batch samples per centroid (`softmax_over: batch`); the
  paper's over the centroids per sample is `softmax_over: classes`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dist import all_reduce_sum, context
from ..losses import Loss
from ..losses.feature import EPSILON_ORDERS, SOFTMAX_AXES, dro_loss
from ..models import Classifier
from ..optim import ParamGroup
from ..registry import METHODS
from ..losses._checks import number
from .base import ClassMeanCentroids, StepResult, refuse_batch_mixing
from .decoupled import _FromStage1, _FrozenBackbone

CE_WEIGHTS = ("count", "none")


def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """The epsilons live outside the DDP-wrapped network: average their gradient as DDP does."""
    ctx = context()
    return all_reduce_sum(grad.clone()) / ctx.world_size if ctx.enabled else grad


class RobustLoss(Loss):
    """The configured classification loss (`base`) plus DRO-LT's state: the learnable epsilons
    (C,), the class centroids (C, D) and whether they were computed yet. Called on logits it is
    `base`; `robust(features, target)` is the robustness loss."""

    neutral_params = None  # not a registered loss: a holder of the method's state

    def __init__(self, base: Loss, *, num_features: int, epsilon_init: float, learn_epsilons: bool,
                 temperature: float, epsilon_order: str, softmax_over: str):
        super().__init__(class_counts=base.class_counts.cpu().numpy())
        self.base = base
        c = self.num_classes
        self.epsilons = nn.Parameter(torch.full((c,), float(epsilon_init)), requires_grad=learn_epsilons)
        if learn_epsilons:
            self.epsilons.register_hook(_mean_over_ranks)
        self.register_buffer("centroids", torch.zeros(c, num_features))
        self.register_buffer("centroids_ready", torch.zeros((), dtype=torch.bool))
        self.temperature, self.epsilon_order, self.softmax_over = temperature, epsilon_order, softmax_over
        sync = getattr(base, "sync_statistics", None)
        if callable(sync):
            self.sync_statistics = sync

    def set_class_weight(self, weight) -> None:
        self.base.set_class_weight(weight)

    def on_epoch_start(self, epoch: int) -> None:
        hook = getattr(self.base, "on_epoch_start", None)
        if callable(hook):
            hook(epoch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base(logits, target)

    def robust(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dro_loss(features, target, self.centroids.to(features.dtype), self.epsilons,
                        temperature=self.temperature, epsilon_order=self.epsilon_order,
                        softmax_over=self.softmax_over)


@METHODS.register("dro_lt")
class DROLT(ClassMeanCentroids, _FromStage1):
    """DRO-LT's feature-extractor stage on a CE stage-1 checkpoint (classifier frozen)."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "DRO-LT: the batch's classes found with torch.unique / bincount for the robust loss (losses/feature.py)",
    )

    def __init__(self, *, cfg, data, stage1: str = "", weight: float = 1.0, temperature: float = 1.0,
                 epsilon_init: float = 1.0, learn_epsilons: bool = True, epsilon_order: str = "official",
                 softmax_over: str = "batch", ce_weight: str = "count"):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        self.weight = number("weight", weight, low=0)
        self.temperature = number("temperature", temperature, low=0)
        if self.temperature == 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(epsilon_init, bool) or not isinstance(epsilon_init, (int, float)) \
                or not math.isfinite(epsilon_init):
            raise ValueError(f"epsilon_init must be a finite number, got {epsilon_init!r}")
        if not isinstance(learn_epsilons, bool):
            raise ValueError(f"learn_epsilons must be true or false, got {learn_epsilons!r}")
        for name, value, allowed in (("epsilon_order", epsilon_order, EPSILON_ORDERS),
                                     ("softmax_over", softmax_over, SOFTMAX_AXES), ("ce_weight", ce_weight, CE_WEIGHTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        self.epsilon_init, self.learn_epsilons = float(epsilon_init), learn_epsilons
        self.epsilon_order, self.softmax_over, self.ce_weight = epsilon_order, softmax_over, ce_weight
        refuse_batch_mixing(cfg, "dro_lt", "its robust loss needs one label per image")
        self._loss: RobustLoss | None = None

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        for p in model.head.parameters():
            p.requires_grad_(False)
        self._feature_dim = model.num_features
        return model

    def build_loss(self) -> RobustLoss:
        self._loss = RobustLoss(super().build_loss(), num_features=self._feature_dim, epsilon_init=self.epsilon_init,
                                learn_epsilons=self.learn_epsilons, temperature=self.temperature,
                                epsilon_order=self.epsilon_order, softmax_over=self.softmax_over)
        return self._loss

    def param_groups(self, model: Classifier) -> list[ParamGroup]:
        """The feature extractor (the head is frozen) and, when learned, the epsilons."""
        groups = [ParamGroup("backbone", [p for p in model.parameters() if p.requires_grad])]
        if self.learn_epsilons:
            if self._loss is None:
                raise RuntimeError("build_loss() must run before param_groups(): the optimiser needs the epsilons")
            groups.append(ParamGroup("epsilons", [self._loss.epsilons]))
        return groups

    def set_train_mode(self, model: Classifier) -> None:
        model.train()
        model.head.eval()

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        if self.ce_weight == "count":
            counts = torch.as_tensor(self.data.class_counts, dtype=torch.float32)
            loss.set_class_weight(counts / counts.max())

    def centroid_buffers(self, model: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_c (C, D), kept in the loss module with the epsilons, and its ready flag."""
        return self._loss.centroids, self._loss.centroids_ready

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        self.ensure_centroids(model, images.device)
        features, logits = forward(images)
        total = loss(logits, target)
        if self.weight:
            total = total + self.weight * loss.robust(features.float(), target)
        return StepResult(total, logits, target)

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        super().on_epoch_end(epoch, model, device)  # a configured weight constraint projects first
        if epoch + 1 < self.cfg.train.epochs:  # the next epoch's centroids, saved with this epoch
            self.update_centroids(model, device)


@METHODS.register("dro_lt_classifier")
class DROLTClassifier(_FrozenBackbone):
    """DRO-LT's classifier stage: the stage-1 (``dro_lt``) classifier, not re-initialised,
    trained with the configured loss on the frozen feature extractor (eval mode by default,
    as the official `freeze_layers(fe_bool=False)`)."""

    def __init__(self, *, cfg, data, stage1: str = "", retrain_bn_stats: bool = False):
        super().__init__(cfg=cfg, data=data, stage1=stage1, retrain_bn_stats=retrain_bn_stats)

    def build_model(self) -> Classifier:
        return self.freeze(self.stage1_model())
