"""The method contract: a recipe built once per run, and the hooks the one training loop calls.

A method turns a config into a `Recipe` (model, loss, sampler, parameter groups) **once per
run** (`build`), then steers the loop through the hooks below. Every hook has a default, so
a method overrides only what it changes: mixup and ISDA change how a batch becomes a loss,
cRT which parameters train and which modules stay in eval mode, DRW and GHM-CWAP what
happens when an epoch starts. Post-hoc methods (tau-normalisation, NCM) set `trains = False`
and implement `fit_posthoc` instead of gradient steps.

| hook | called | default |
|---|---|---|
| `build(services) -> Recipe` | once per run: train, eval and `longtail.load` | the config's model / loss / sampler, one parameter group |
| `set_train_mode(model)` | at each epoch start | `model.train()` |
| `on_epoch_start(epoch, loss)` | at each epoch start | RW / DRW class weights; the loss's own `on_epoch_start` |
| `training_step(model, forward, images, target, loss, generator) -> StepResult` | each step | the loss on the logits (mixup when `train.mixup_alpha > 0`, CutMix when `train.cutmix_alpha > 0`) |
| `after_step(model)` | after each optimiser step, on every process | the `constraint` section's projection when `every: step` |
| `on_epoch_end(epoch, model, device)` | after each epoch's steps, before validation, on every process | the `constraint` section's projection when `every: epoch` (a method that learns from the validation split, e.g. CDB-W-CE, evaluates here) |
| `fit_posthoc(model, device) -> dict` | post-hoc methods, instead of steps | - |
| `evaluate(model, split, **kw) -> (metrics, arrays)` | validation and test evaluation | class metrics of the logits, {logits, labels} |
| `state_dict()` / `load_state_dict(state)` | every checkpoint; resume; rebuilding a run's network | nothing |
| `plain_ce_epochs()` | branching off a plain-CE run | 0 |
| `views` (attribute) / `batches.views` | each step, before `training_step` | `()`: no extra views |
| `test_time_aggregation(model, split, subsets, ...) -> dict` | `longtail eval --test-agnostic`, methods with `aggregates_at_test_time` | - (the stored logits are scored as they are) |

Class attributes: `trains` (False: post-hoc), `stage` (2: the method continues the stage-1
run named by `method.params.stage1`), `pretext` (the task a pre-training run's head
predicts instead of classes, e.g. 'rotation'; None for classifiers), `views` (the extra view
pipelines of each batch the method needs, names of data.augment.VIEWS; an instance may set its
own from method.params, as BCL's `views`), `aggregates_at_test_time` (True: the test-agnostic
evaluation also asks the method to adapt to each unlabelled test set, SADE's self-supervised
expert aggregation), `host_syncs` (one-line reasons why the method's own step reads device values
on the host; see below).

Host syncs (issue 21): a step that reads a device value on the host (`.item()`, `bool(t)`, `float(t)`,
`.tolist()`, `.numpy()`, `.cpu()`) or runs a value-sized op (`nonzero`, `unique`, `x[mask]`,
`bincount`) or draws per-step values on the host cannot be captured in a CUDA graph. Keep step
state in device tensors and compute with masks / `torch.where`; where that is not possible
(without changing results), declare why in `host_syncs` (a loss in its own `host_syncs`).
`capture_blockers(loss)` returns the declared reasons of a method + loss + the loop's
config-driven ones, () for a sync-free step; `tests/test_host_sync.py` audits every
configs/cifar10_lt config against it (engine/host_sync.py's detector; docs/speed.md).

Extra views (contrastive methods: BCL; later PaCo, ProCo, KCL, GLMC): with `views` non-empty the
loop makes, from the same raw uint8 batch as the main view (`images`), one augmented view per
name (`BatchAugment.view`: 'regular', 'simclr', 'simclr_randaugment', 'randaugment', 'crop_jitter', 'mocov2'), drawing
from the step's generator after the main view, in order, for the whole global batch (resume and
sharding stay exact, on the device-resident path too), and puts them in `self.batches.views`
before `training_step`. `views = ()` (every plain method) draws nothing more: bitwise the
steps of before.

`Method.batches` (a `TrainBatches`, set by the Trainer) is the loop's batch reader: a method that
needs extra training batches in a step (BBN's re-balancing batch) reads and augments them the
loop's way, with the loop's current epoch, step and global batch size. `step_position(images)`
gives that (epoch, step, global batch size), and `extra_fetch(device)` that reader, in the loop
and without one (a step called directly, as the contract test does: the epoch of the last
`on_epoch_start` and the steps counted since; the training split read by `direct_fetch`), so a
method that seeds its own draws by (epoch, step) keeps no counter of its own.

A run's network rebuilds from its own folder (`rebuild_model`): the method is built with
the run's `DataInfo` (no images), its saved state loaded first (a stage-2 method keeps the
stage-1 config there), and `weights_from_checkpoint` set, so no stage-1 file or initial
weights file is read: every weight comes from the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data.augment import BatchAugment
from ..data.mixup import cutmix_batch, mixup_batch
from ..errors import ConfigError
from ..eval.metrics import compute_metrics
from ..eval.predict import predict
from ..data.samplers import Sampler, build_sampler
from ..losses import Loss, build_loss, effective_number_weights, inverse_frequency_weights
from ..models import Classifier, build_model, load_weights
from ..models.experts import ExpertNetwork, configured_num
from ..optim import ParamGroup
from ..optim.constraints import MaxNorm, build_constraint
from ..registry import LOSSES, METHODS


@dataclass
class StepResult:
    """What one training step hands the loop: the scalar to backpropagate, and the logits (B, K)
    with the labels (B,) training accuracy is scored against (the class labels, or a pretext
    task's own labels, such as SSP's rotations)."""

    loss: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor


@dataclass
class Services:
    """What a method may need from higher floors, injected by the caller (never imported).

    `run_features(run_dir) -> (features (N, D), labels (N,), num_classes)`: the training features
    of another run folder (SWRM's `similarity_run`).
    """

    run_features: Callable[[str], tuple[np.ndarray, np.ndarray, int]] | None = None


@dataclass
class TrainBatches:
    """The loop's batch reader, handed to the method by the Trainer (`Method.batches`), for a
    method that draws extra training batches (BBN's re-balancing batch).

    `fetch(global_positions, generator) -> (images, target)`: this process's share of the
    global batch at those training positions, read (the device-resident copy on a GPU) and
    augmented with the loop's own BatchAugment, its random draws taken from `generator` for the
    whole global batch (as the loop's batches), so every rank count gives the same batch.
    `epoch`, `step` (0-idx) and `global_size` (the step's batch size over all processes) describe
    the step the loop is in; it updates them before each `training_step`.
    `views`: the step's extra views (B, C, H, W), one per name of `Method.views`, of the same images
    as the step's main view; `fetch_views(global_positions, generator) -> (images, target, views)`
    reads an extra batch with them.
    """

    fetch: Callable[[np.ndarray, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    fetch_views: Callable | None = None
    views: tuple = ()
    epoch: int = 0
    step: int = 0
    global_size: int = 0


@dataclass
class Recipe:
    """A method's components for one run, built once."""

    method: "Method"
    model: Classifier
    loss: Loss | None = None
    sampler: Sampler | None = None
    param_groups: list[ParamGroup] = field(default_factory=list)


def class_weight_for(scheme: str, class_counts, beta: float) -> torch.Tensor | None:
    """Per-class weights of the `reweight` schedule (sum C), or None for 'none'."""
    if scheme == "none":
        return None
    if scheme == "effective_number":
        return effective_number_weights(class_counts, beta)
    if scheme == "inverse_frequency":
        return inverse_frequency_weights(class_counts)
    raise ValueError(f"unknown re-weighting scheme '{scheme}'")


class Method:
    """Default hooks: one stage, the configured model / loss / sampler, RW / DRW, mixup.

    `data` is the run's `LTData` when training or evaluating, or its `DataInfo` (class names
    and counts, channels, image shape, normalisation; no images) when a trained run's network
    is rebuilt.
    """

    trains = True
    stage = 1
    pretext: str | None = None
    rebalancing = False  # True: its classifier already aims at balanced classes (inference.py)
    views: tuple[str, ...] = ()  # extra view pipelines per batch (data.augment.VIEWS), in batches.views
    aggregates_at_test_time = False  # True: implements test_time_aggregation (runs.evaluate_test_agnostic)
    host_syncs: tuple[str, ...] = ()  # why the method's own step reads device values on the host (capture_blockers)

    def __init__(self, *, cfg, data):
        self.cfg, self.data = cfg, data
        self.services = Services()
        self.weights_from_checkpoint = False  # rebuilding a run: every weight comes from its checkpoint
        self.constraint: MaxNorm | None = None  # the config's `constraint`, set by build()
        self.batches: TrainBatches | None = None  # the loop's batch reader, set by the Trainer
        self._epoch = self._step = 0  # the step in progress (step_position); set by on_epoch_start

    # -- building (once per run)
    def build(self, services: Services | None = None) -> Recipe:
        """Model, loss, sampler and parameter groups of a training run, in that order (a
        method's loss may add parameters, e.g. DySWRM's similarity vector)."""
        self.services = services or Services()
        model = _checked(self.cfg, "model", self.build_model)
        if not self.trains:
            if self.cfg.constraint.name != "none":
                raise ConfigError(f"constraint '{self.cfg.constraint.name}' needs a method that trains; "
                                  f"'{self.cfg.method.name}' is post-hoc")
            return Recipe(method=self, model=model)
        # radii from the weights training starts from (a resumed run rebuilds the same model first)
        c = self.cfg.constraint
        self.constraint = _checked(self.cfg, "constraint", lambda: build_constraint(c.name, c.params, model))
        loss = _checked(self.cfg, "loss", self.build_loss)
        sampler = _checked(self.cfg, "sampler", self.build_sampler)
        return Recipe(method=self, model=model, loss=loss, sampler=sampler, param_groups=self.param_groups(model))

    def build_model(self) -> Classifier:
        m = self.cfg.model
        model = build_model(m.name, num_classes=self.data.num_classes, in_channels=self.data.channels,
                            head=m.head, params=m.params)
        if m.weights and not self.weights_from_checkpoint:
            load_weights(model, m.weights)
        return model

    def build_loss(self) -> Loss:
        """The configured loss. A loss whose schedule spans the run (class attribute
        `follows_train_epochs`, e.g. cyclical focal) gets `epochs = train.epochs` unless
        loss.params sets it."""
        params = dict(self.cfg.loss.params or {})
        if getattr(LOSSES.get(self.cfg.loss.name), "follows_train_epochs", False):
            params.setdefault("epochs", self.cfg.train.epochs)
        return build_loss(self.cfg.loss.name, params, class_counts=self.data.class_counts)

    def build_sampler(self) -> Sampler:
        s = self.cfg.sampler
        return build_sampler(s.name, s.params, labels=self.data.train.labels, class_counts=self.data.class_counts,
                             seed=self.cfg.train.seed, epochs=self.cfg.train.epochs)

    def param_groups(self, model: Classifier) -> list[ParamGroup]:
        """What the optimiser updates: by default every trainable parameter of the model, at the
        run's learning rate and weight decay."""
        return [ParamGroup("model", [p for p in model.parameters() if p.requires_grad])]

    # -- per epoch / per step
    def set_train_mode(self, model: Classifier) -> None:
        model.train()

    def on_epoch_start(self, epoch: int, loss: Loss) -> None:
        self._epoch, self._step = epoch, 0  # step_position's count without a loop
        r = self.cfg.reweight
        weight = class_weight_for(r.scheme, self.data.class_counts, r.beta) if epoch >= r.start_epoch else None
        loss.set_class_weight(weight)
        # losses with per-epoch statistics (GHM-CWAP's histograms) learn here that an epoch starts
        hook = getattr(loss, "on_epoch_start", None)
        if callable(hook):
            hook(epoch)

    def logits(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training-time logits (B, C). `forward(images) -> (pooled features, logits)` is the
        (possibly DDP-wrapped) forward pass; `model` gives access to weights. ISDA overrides this."""
        return forward(images)[1]

    def step_position(self, images: torch.Tensor) -> tuple[int, int, int]:
        """(epoch, step, global batch size) of the step in progress, for a method that seeds its own
        draws by them (BBN, CMO, GLMC, MetaSAug): the loop's (`self.batches`); without a loop (a step
        called directly, as the contract test does) the epoch of the last `on_epoch_start`, the steps
        counted since, and this batch's size. Call it once per `training_step`: afterwards
        `self._epoch` is the epoch and `self._step` the steps of the epoch taken, this one included."""
        b = self.batches
        if b is not None:
            epoch, step, size = b.epoch, b.step, b.global_size
        else:
            epoch, step, size = self._epoch, self._step, images.shape[0]
        self._epoch, self._step = epoch, step + 1
        return epoch, step, size

    def extra_fetch(self, device):
        """The reader of extra training batches: the loop's `batches.fetch`, or `direct_fetch(device)`
        without a loop."""
        return self.batches.fetch if self.batches is not None else self.direct_fetch(device)

    def direct_fetch(self, device):
        """A stand-in for `self.batches.fetch` without a loop (a step called directly, as the contract
        test does): the training split read and augmented the loop's way (`loop_augment`), one process."""
        if getattr(self, "_direct_augment", None) is None:
            self._direct_augment = loop_augment(self.cfg, self.data, device)
        augment = self._direct_augment

        def fetch(positions, generator):
            raw = torch.from_numpy(self.data.train.batch(positions)).to(device)
            return augment(raw, generator), torch.from_numpy(self.data.train.labels[positions]).to(device)

        return fetch

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss: Loss,
                      generator: torch.Generator) -> StepResult:
        """The loss of one batch. With train.mixup_alpha > 0 the batch is mixed (Zhang et al.
        2018, as MiSLAS stage 1): loss = lam * L(z, y_a) + (1 - lam) * L(z, y_b); with
        train.cutmix_alpha > 0 a train.cutmix_prob share of the batches is CutMixed, the same
        loss with lam the kept pixel fraction."""
        t = self.cfg.train
        alpha = t.mixup_alpha
        if alpha > 0:
            images, target_b, lam = mixup_batch(images, target, alpha=alpha, generator=generator)
            logits = self.logits(model, forward, images, target)
            return StepResult(lam * loss(logits, target) + (1.0 - lam) * loss(logits, target_b), logits, target)
        # CutMix (Yun et al. 2019) on a cutmix_prob share of the batches: the official train.py
        if t.cutmix_alpha > 0 and float(torch.rand(1, generator=generator)) < t.cutmix_prob:
            images, target_b, lam = cutmix_batch(images, target, alpha=t.cutmix_alpha, generator=generator)
            logits = self.logits(model, forward, images, target)
            return StepResult(lam * loss(logits, target) + (1.0 - lam) * loss(logits, target_b), logits, target)
        logits = self.logits(model, forward, images, target)
        return StepResult(loss(logits, target), logits, target)

    def after_step(self, model: Classifier) -> None:
        """Called after every optimiser step on every process (the same weights everywhere): projects
        onto the configured constraint (`constraint`, e.g. MaxNorm with `every: step`). A method that
        overrides this calls super().after_step(model)."""
        if self.constraint is not None and self.constraint.every == "step":
            self.constraint.project(model)

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        """Called after 0-idx `epoch`'s steps, before validation and the checkpoint, on every
        process: state computed here is saved with that epoch (resume-exact) and must come out
        the same on every rank (evaluate on all ranks, never on rank 0 alone). Projects onto the
        configured constraint with `every: epoch` (MaxNorm's official placement); a method that
        overrides this calls super().on_epoch_end(epoch, model, device)."""
        if self.constraint is not None and self.constraint.every == "epoch":
            self.constraint.project(model)

    def capture_blockers(self, loss: Loss | None = None) -> tuple[str, ...]:
        """One-line reasons why a training step of this method with `loss` reads device values on
        the host (a CUDA graph cannot capture it: a future graph mode falls back to eager and logs
        them; issue 21), () where the step is sync-free: the method's own `host_syncs` and, where
        the step calls the loss, the loss's `host_syncs`. A method whose syncs depend on its
        configuration overrides this. The loop's own per-step host work is added from the config:
        a strong augmentation policy, mixup / CutMix and extra views other than 'regular' draw on
        the host every step. Checked against the audit in tests/test_host_sync.py."""
        reasons = list(self.host_syncs) + list(getattr(loss, "host_syncs", ()))
        t = self.cfg.train
        if t.augment.policy != "none":
            reasons.append(f"train.augment.policy '{t.augment.policy}': each image's ops drawn and grouped on the host "
                           "every step (data/strong_augment.py)")
        if t.mixup_alpha > 0:
            reasons.append("train.mixup_alpha: mixup's lam drawn on the host every step (data/mixup.py)")
        if t.cutmix_alpha > 0:
            reasons.append("train.cutmix_alpha: CutMix's box and lam drawn on the host every step (data/mixup.py)")
        extra = [v for v in dict.fromkeys(self.views) if v != "regular"]
        if extra:
            reasons.append(f"extra views {', '.join(extra)}: their per-image ops drawn and grouped on the host every "
                           "step (data/simclr_augment.py, data/strong_augment.py)")
        return tuple(reasons)

    # -- evaluation
    def evaluate(self, model: Classifier, split, *, mean, std, batch_size: int, device, channels_last: bool,
                 **metric_kw) -> tuple[dict, dict]:
        """(metrics, prediction arrays) of `split`: by default the class metrics of the logits and
        {logits (N, C), labels (N,)}; a pretext run (SSP) scores its own task instead."""
        out = predict(model, split, mean=mean, std=std, batch_size=batch_size, device=device,
                      channels_last=channels_last)
        return compute_metrics(out["logits"], out["labels"], self.data.class_counts, **metric_kw), out

    def test_time_aggregation(self, model: Classifier, split, subsets: dict, *, mean, std, batch_size: int, device,
                              channels_last: bool = False, seed: int = 0) -> dict:
        """Adapt to each unlabelled test subset (`subsets`: name -> indices into `split`) and return
        {name: {"logits": (n, C) adapted logits of its images, plus JSON-able details}}; only for
        methods with `aggregates_at_test_time` (SADE). The labels of `split` are not to be read."""
        raise NotImplementedError(f"{type(self).__name__} has no test-time aggregation")

    # -- branching (engine/branch.py)
    def plain_ce_epochs(self) -> float:
        """Leading epochs in which this configuration trains exactly like the standard method
        with unweighted `ce` (same steps, no method or loss state), so a run may branch off a
        plain-CE run's checkpoint inside them. Conservative: 0 unless a method says more."""
        return 0

    def _unweighted_epochs(self) -> float:
        r = self.cfg.reweight
        return math.inf if r.scheme == "none" else r.start_epoch

    # -- post-hoc methods
    def fit_posthoc(self, model: Classifier, device) -> dict:
        raise NotImplementedError(f"{type(self).__name__} trains with gradient steps")

    # -- state saved in checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def logits_prior(cfg, class_counts) -> np.ndarray:
    """(C,) float64: the prior a run's logits are calibrated to, where post-hoc adjustment starts
    from: its method's (`calibrated_prior(class_counts, method.params)`, SADE's expert mean) where
    the method states one, else its loss's (`logit_adjust.source_prior`)."""
    from ..logit_adjust import source_prior

    stated = getattr(METHODS.get(cfg.method.name), "calibrated_prior", None) if cfg is not None else None
    if stated is not None:
        return np.asarray(stated(class_counts, dict(cfg.method.params or {})), dtype=np.float64)
    return source_prior(cfg, class_counts)


def build_method(cfg, data) -> Method:
    """The configured method (`method.name`, `method.params`) for `data` (LTData or DataInfo)."""
    return METHODS.build(cfg.method.name, cfg=cfg, data=data, **cfg.method.params)


def build_recipe(cfg, data, services: Services | None = None) -> Recipe:
    """The run's method and its recipe. A component's own parameter check (ValueError) becomes a
    ConfigError naming its config section, so bad names or parameters fail before a run folder
    exists."""
    return _checked(cfg, "method", lambda: build_method(cfg, data)).build(services)


def refuse_batch_mixing(cfg, method: str, why: str = "") -> None:
    """Refuse the loop's batch mixing (`train.mixup_alpha` / `train.cutmix_alpha` > 0) for a method
    whose step cannot take it: a one-line ConfigError naming the method, `why` when given, and each
    key set to mix. For a method whose `training_step` does not call `Method.training_step` (where
    mixup and CutMix happen) the keys would otherwise be silently ignored."""
    keys = [f"train.{key}" for key in ("mixup_alpha", "cutmix_alpha") if getattr(cfg.train, key, 0) > 0]
    if keys:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"method '{method}' does not take the loop's mixup / CutMix{reason}; set "
                          + " and ".join(f"{key}: 0" for key in keys))


def require_experts(cfg, method: str, *, minimum: int = 1, exactly: bool = False, example: str = "",
                    model: Classifier | None = None) -> None:
    """Refuse a network without the expert split `method` needs: a one-line ConfigError naming the
    method, the key `model.params.experts` (with `example`) and the count, unless the network has at
    least `minimum` experts (exactly `minimum` with `exactly`). Without `model` the count is the one
    the config's `model.params.experts` asks for (checked before anything is built; a malformed value
    passes, the network's own check names it); with `model`, its `num_experts` (0 for a network
    that is no models.experts.ExpertNetwork)."""
    if model is None:
        num = configured_num((cfg.model.params or {}).get("experts"))
    else:
        num = model.num_experts if isinstance(model, ExpertNetwork) else 0
    if num is None or (num == minimum if exactly else num >= minimum):
        return
    count = f"{'exactly' if exactly else 'at least'} {minimum} expert{'s' if minimum != 1 else ''}"
    hint = f", e.g. {example}" if example else ""
    raise ConfigError(f"method '{method}' needs a network with {count} (model.params.experts{hint}); "
                      f"model '{cfg.model.name}' has {num or 'none'}")


def loop_augment(cfg, data, device) -> BatchAugment:
    """The loop's training augmentation (train.augment) as a BatchAugment on `device`, for a method
    that augments images outside the loop's batches (BBN's / CMO's direct fetch, MetaSAug's meta
    batch, SADE's test-time views)."""
    a, t = cfg.train.augment, cfg.train
    return BatchAugment(mean=data.mean, std=data.std, crop_padding=a.crop_padding, flip=a.flip, device=device,
                        channels_last=t.channels_last, policy=a.policy, randaugment_n=a.randaugment_n,
                        randaugment_m=a.randaugment_m, randaugment_mstd=a.randaugment_mstd, cutout=a.cutout)


@torch.no_grad()
def class_mean_features(model: Classifier, cfg, data, device) -> torch.Tensor:
    """(C, D) float64: each class's mean pooled feature of its un-augmented training images, the
    network in eval mode (OLTR's memory, DRO-LT's centroids); a class without images gets zeros."""
    t = cfg.train
    out = predict(model, data.train, mean=data.mean, std=data.std, batch_size=t.eval_batch_size, device=device,
                  features=True, channels_last=t.channels_last)
    feats = torch.from_numpy(out["features"]).double()
    labels = torch.from_numpy(out["labels"])
    c = data.num_classes
    sums = torch.zeros(c, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats)
    return sums / torch.bincount(labels, minlength=c).clamp_min(1).double()[:, None]


class ClassMeanCentroids:
    """Mixin for a method (OLTR's memory, DRO-LT's centroids) whose (C, D) centroids are the class
    means of the training set's features (`class_mean_features`), computed before the first step.
    The centroids and a bool `ready` flag are buffers of the model or the loss (`centroid_buffers`),
    so checkpoints hold them and a resumed run does not recompute them."""

    def centroid_buffers(self, model: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids (C, D), ready ()) of this method's model or loss."""
        raise NotImplementedError

    @torch.no_grad()
    def update_centroids(self, model: Classifier, device) -> None:
        """Centroids = class means of the eval-mode features of the un-augmented training images;
        the model is back in train mode after."""
        centroids, ready = self.centroid_buffers(model)
        centroids.copy_(class_mean_features(model, self.cfg, self.data, device).to(centroids))
        ready.fill_(True)
        self.set_train_mode(model)

    def ensure_centroids(self, model: Classifier, device) -> None:
        """Before a step: compute the centroids unless a checkpoint or an earlier step did. The flag
        is read on the host until it has been seen set once, never after: no host sync in later
        steps (issue 21)."""
        ready = self.centroid_buffers(model)[1]
        if getattr(self, "_seen_ready", None) is not ready:
            if not bool(ready):
                self.update_centroids(model, device)
            self._seen_ready = ready


def rebuild_model(cfg, info, checkpoint: dict) -> Classifier:
    """The network of a trained run from its config, its `DataInfo` and a checkpoint dict, without
    its images, its stage-1 file or its initial weights file; the weights are loaded."""
    method = build_method(cfg, info)
    method.load_state_dict(checkpoint.get("method", {}) or {})
    method.weights_from_checkpoint = True
    model = method.build_model()
    model.load_state_dict(checkpoint["model"])
    return model


def _checked(cfg, section: str, build):
    try:
        return build()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{section} '{getattr(cfg, section).name}': {str(err).splitlines()[0]}") from None
