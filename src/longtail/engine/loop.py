"""The training loop: one loop for every method, driven by the method's hooks.

Per epoch: learning rate from the schedule, `method.on_epoch_start` (re-weighting), the
sampler's order for (seed, epoch), batches augmented on the device with a generator seeded
by (seed, epoch), SGD steps; then validation (if configured), `metrics.jsonl` and an
atomic checkpoint, then the run's callbacks (longtail.callbacks: TensorBoard, user loggers; rank 0,
RNG states restored around them). Randomness depends only on (seed, epoch) and the saved states, so
`resume` from the last checkpoint ends with the same weights as an uninterrupted run
(bitwise on CPU with train.deterministic).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import dist as distributed
from ..callbacks import CallbackContext, CallbackList, build_callbacks
from ..config import RunConfig
from ..data.augment import BatchAugment
from ..data.build import LTData
from ..data.samplers import split_batch
from ..dist import resolve_device
from ..errors import CheckpointError, ConfigError, LongtailError
from ..io import atomic_torch_save, safe_torch_load
from ..log import bar_enabled
from ..methods import Recipe, build_method, build_recipe
from ..methods.base import TrainBatches
from ..optim import ParamGroup, build_optimizer, learning_rate, no_decay_split, set_learning_rate
from ..rundir import RunDir
from . import branch, graphs

log = logging.getLogger(__name__)

class TrainingError(LongtailError):
    """Training cannot go on (non-finite loss)."""


def optimizer_params(cfg: RunConfig) -> dict:
    """The optimizer's own parameters: SGD's momentum and Nesterov switch come from `train`,
    anything else from `optimizer.params`."""
    params = dict(cfg.optimizer.params)
    if cfg.optimizer.name == "sgd":
        for key in ("momentum", "nesterov"):
            if key in params:
                raise ConfigError(f"optimizer.params.{key}: set train.{key} instead (one place for SGD's {key})")
        params.update(momentum=cfg.train.momentum, nesterov=cfg.train.nesterov)
    return params


def make_optimizer(cfg: RunConfig, groups: list[ParamGroup], model: torch.nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer over the recipe's parameter groups (split into decay / no decay with
    optimizer.no_decay_norm_bias). An invalid optimizer parameter is a ConfigError naming it."""
    if cfg.optimizer.no_decay_norm_bias:
        groups = [part for g in groups for part in no_decay_split(g, model)]
    try:
        return build_optimizer(cfg.optimizer.name, groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               params=optimizer_params(cfg))
    except ValueError as err:
        raise ConfigError(f"optimizer '{cfg.optimizer.name}': {str(err).splitlines()[0]}") from None


def check_optimizer(cfg: RunConfig) -> None:
    """Build the configured optimizer once on a stand-in parameter: bad names or parameters fail
    before a run folder exists."""
    make_optimizer(cfg, [ParamGroup("check", [torch.nn.Parameter(torch.zeros(1))])], torch.nn.Identity())


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


def _progress(total: int, desc: str, enabled: bool):
    """The run's progress bar; drawn only on a terminal (log.bar_enabled), else the epoch lines alone."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False, disable=not bar_enabled(enabled),
                dynamic_ncols=True, mininterval=0.5)


class TrainForward(torch.nn.Module):
    """images -> (pooled features (B, D), logits (B, C)); the module DDP wraps, so every
    method's forward pass (ISDA needs the features) goes through DDP's gradient hooks.

    With `autocast_dtype` (train.precision bf16) the pass runs under torch.autocast and both
    outputs are returned in float32, so losses, method statistics and accuracy are computed
    in fp32; parameters, gradients and optimiser state stay fp32 (master weights).
    """

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 autocast_cache: bool = True):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.autocast_cache = autocast_cache

    def graph_copy(self) -> "TrainForward":
        """The same pass over the same model for CUDA-graph capture (engine/graphs.py): autocast's
        weight-cast cache off, as torch.cuda.make_graphed_callables requires."""
        return TrainForward(self.model, autocast_dtype=self.autocast_dtype, autocast_cache=False)

    def forward(self, images: torch.Tensor):
        if self.autocast_dtype is None:
            return self._pass(images)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype, cache_enabled=self.autocast_cache):
            pooled, logits = self._pass(images)
        return pooled.float(), logits.float()

    def _pass(self, images: torch.Tensor):
        pooled = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return pooled, self.model.head(pooled)


def resident_split(split, device: torch.device, max_bytes: int, chunk: int = 4096):
    """(uint8 images (N, H, W, C), labels (N,)) of a training split copied to `device` once,
    or None when the images take more than `max_bytes`. Batches are then gathered on the
    device instead of being copied from host memory every step."""
    n = len(split)
    if n * int(np.prod(split.images.shape[1:])) > max_bytes:
        return None
    images = torch.empty((n, *split.images.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, n, chunk):
        pos = np.arange(start, min(start + chunk, n))
        images[start:start + len(pos)] = torch.from_numpy(split.batch(pos)).to(device)
    return images, torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)


class Trainer:
    """Holds what one training run needs; `run()` trains the remaining epochs.

    Under torchrun (docs/distributed.md) the forward pass runs through
    DistributedDataParallel, each rank takes its shard of the global order and batch,
    losses and accuracies are reduced over ranks, the ranks' parameters are compared after
    every epoch, and only rank 0 validates and writes.
    """

    def __init__(self, cfg: RunConfig, data: LTData, run_dir: str | Path, *, recipe: Recipe | None = None,
                 callbacks: list | None = None):
        self.cfg, self.data = cfg, data
        self.rundir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.run_dir = self.rundir.path
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.device = resolve_device(t.device)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not t.deterministic  # autotuned convolutions unless reproducibility is asked
        if recipe is None:  # the caller seeds and builds the recipe once (runs.train_run); here for direct use
            torch.manual_seed(t.seed)
            recipe = build_recipe(cfg, data)
        self.method = recipe.method
        self.model = recipe.model.to(self.device)  # Module.to keeps the Parameter objects the groups hold
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = recipe.loss.to(self.device)
        self.sampler = recipe.sampler
        self.optimizer = make_optimizer(cfg, recipe.param_groups, self.model)
        a = t.augment
        self.augment = BatchAugment(mean=data.mean, std=data.std, crop_padding=a.crop_padding, flip=a.flip,
                                    device=self.device, channels_last=t.channels_last, policy=a.policy,
                                    randaugment_n=a.randaugment_n, randaugment_m=a.randaugment_m,
                                    randaugment_mstd=a.randaugment_mstd, cutout=a.cutout)
        self.start_epoch = 0
        self.best = {"epoch": None, "top1": -math.inf}
        self._last_is_sound = True  # False after resuming from prev.pt: last.pt is not kept as prev.pt then
        self.dist = distributed.context()
        # only rank 0 reports: the other ranks build no callback (no TensorBoard writer, no user logger)
        self.callbacks = CallbackList(build_callbacks(cfg, self.rundir, callbacks) if self.dist.is_main else [])
        self._sync_loss_statistics = getattr(self.loss_fn, "sync_statistics", None)
        autocast_dtype = distributed.autocast_dtype(t)  # train.precision 'auto' resolved on this machine
        if t.precision == "bf16" and self.device.type == "cpu" and not distributed.cpu_bf16_features():
            log.warning("train.precision is bf16 but this CPU (%s) has no native bf16 (no AMX-BF16 or "
                        "AVX512-BF16): autocast emulates it, about ten times slower than fp32 (docs/speed.md)",
                        distributed.cpu_model())
        self.forward: torch.nn.Module = TrainForward(self.model, autocast_dtype=autocast_dtype)
        # on a GPU the training images live on the device when they take under a quarter of its free memory
        self._resident = (resident_split(data.train, self.device, torch.cuda.mem_get_info(self.device)[0] // 4)
                          if self.device.type == "cuda" else None)
        # a method's extra views of each batch (Method.views: BCL's SimCLR views), drawn after the main view
        self.views = [self.augment.view(name) for name in self.method.views]
        self.batches = TrainBatches(fetch=self.train_batch, fetch_views=self.train_views)  # a method's extra batches
        self.method.batches = self.batches
        if self.dist.enabled:
            if t.batch_size % self.dist.world_size:
                raise ConfigError(f"train.batch_size ({t.batch_size}) is the global batch and must be divisible "
                                  f"by the number of processes ({self.dist.world_size})")
            if t.sync_bn:
                if self.device.type != "cuda":
                    raise ConfigError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                self.forward = TrainForward(self.model, autocast_dtype=autocast_dtype)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=ids)
        if t.compile:
            self.forward = torch.compile(self.forward)  # weights stay in self.model: checkpoints are unchanged
        self.graph: graphs.GraphedForward | None = None  # train.cuda_graph (engine/graphs.py)
        if t.cuda_graph:
            reason = graphs.unsupported_reason(self.device, distributed=self.dist.enabled, compiled=t.compile)
            if reason is None:
                self.forward = self.graph = graphs.GraphedForward(self.forward, batch_size=t.batch_size)
            elif self.dist.is_main:
                log.warning("train.cuda_graph is set but this run trains eager: %s", reason)

    def resume(self) -> None:
        """Restore model, optimiser, epoch, best-val and RNG state; drop metrics of unsaved epochs.
        Where last.pt fails its integrity check, from prev.pt (the epoch before)."""
        ckpt, path = self.rundir.load_checkpoint("last", action="resuming from", warn=self.dist.is_main)
        self._last_is_sound = path == self.rundir.last
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.loss_fn.load_state_dict(ckpt.get("loss", {}), strict="loss" in ckpt)
            self.method.load_state_dict(ckpt.get("method", {}))
            self.start_epoch = int(ckpt["epoch"])
            self.best = {"epoch": ckpt["best_val_epoch"], "top1": float(ckpt["best_val_top1"])}
            torch.set_rng_state(ckpt["torch_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {str(err).splitlines()[0]}") from None
        if self.dist.is_main:
            self.rundir.keep_metrics_before(self.start_epoch)
            log.info("resuming %s after epoch %d/%d", self.run_dir, self.start_epoch, self.cfg.train.epochs)

    def branch(self, source: str | Path) -> None:
        """Start from another run's checkpoint at epoch E (engine/branch.py): model, optimiser,
        epoch, best-val record, RNG state and metrics of epochs < E; this run's own method and
        loss start fresh, as they would be at epoch E when training from scratch."""
        path = branch.source_checkpoint(source)
        ckpt = safe_torch_load(path)
        source_cfg = branch.source_config(ckpt, path)
        epoch = int(ckpt["epoch"])
        branch.check_branch(self.cfg, source_cfg, epoch, plain_epochs=self.method.plain_ce_epochs(),
                            source_plain_epochs=build_method(source_cfg, self.data).plain_ce_epochs(), source=path)
        try:
            self.model.load_state_dict(ckpt["model"])
            branch.load_optimizer_prefix(self.optimizer, ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"])
            best_epoch = ckpt["best_val_epoch"]
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {str(err).splitlines()[0]}") from None
        self.start_epoch = epoch
        if self.dist.is_main:
            self.rundir.keep_metrics_before(epoch, source=RunDir(path.parent.parent))  # the source run's prefix lines
            self.rundir.keep_sessions_before(epoch, source=RunDir(path.parent.parent))  # and the machines of them
            if branch.copy_best_val(path, self.rundir, best_epoch):
                self.best = {"epoch": best_epoch, "top1": float(ckpt["best_val_top1"])}
            branch.write_branch_record(self.rundir, path, epoch)
            self.save(epoch - 1)  # the branch point is this run's first checkpoint: --resume works from here
            log.info("branched from %s after epoch %d/%d", path, epoch, self.cfg.train.epochs)

    def run(self) -> dict:
        t = self.cfg.train
        started = time.time()
        bar = _progress((t.epochs - self.start_epoch) * len(self.sampler), "train", t.progress and self.dist.is_main)
        context = CallbackContext(run_dir=self.rundir, cfg=self.cfg, class_names=list(self.data.class_names),
                                  class_counts=[int(c) for c in self.data.class_counts], epochs=t.epochs,
                                  start_epoch=self.start_epoch)
        # this session's line of sessions.jsonl, written with its first epoch's metrics line
        session = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "start_epoch": self.start_epoch,
                   "epochs": t.epochs, "world_size": self.dist.world_size,
                   "machine": distributed.machine_record(
                       self.device, "bf16" if distributed.autocast_dtype(t) is not None else "fp32")}
        try:
            self.callbacks.call("on_train_start", context)
            for epoch in range(self.start_epoch, t.epochs):
                row = self.train_epoch(epoch, bar)
                self.method.on_epoch_end(epoch, self.model, self.device)
                if self.dist.enabled:
                    row["ranks_identical"] = self.ranks_identical()
                    if not row["ranks_identical"]:
                        raise TrainingError(f"the processes' weights diverged in epoch {epoch + 1}")
                if self.dist.is_main:
                    row.update(self.validate(epoch))
                    row.update(self.test_curve(epoch))
                    if session is not None:
                        self.rundir.append_session(session)
                        session = None
                    self.rundir.append_metrics(row)
                    self.save(epoch)
                    self.callbacks.call("on_epoch_end", epoch + 1, dict(row), context)
                distributed.barrier()
                if not self.dist.is_main:
                    continue
                val_text = f", val top1 {row['val_top1']:.2f}" if "val_top1" in row else ""
                if "test_curve_top1" in row:
                    val_text += f", test top1 {row['test_curve_top1']:.2f} (diagnostic)"
                log.info(f"epoch {epoch + 1}/{t.epochs}: lr {row['lr']:.2e}, loss {row['train_loss']:.4f}, "
                         f"train top1 {row['train_top1']:.2f}{val_text}, {row['images_per_s']:.0f} img/s, "
                         f"{row['seconds']:.1f}s")  # through tqdm.write (log.setup): the bar stays intact
        except BaseException:
            bar.close()
            self.callbacks.end_quietly(context)  # the training error is the one to report
            raise
        bar.close()
        self.callbacks.call("on_train_end", context)
        return {"epochs": t.epochs, "best_val_epoch": self.best["epoch"], "seconds": time.time() - started}

    def train_epoch(self, epoch: int, bar) -> dict:
        t, device = self.cfg.train, self.device
        lr = learning_rate(epoch, base_lr=t.lr, epochs=t.epochs, schedule=t.lr_schedule,
                           warmup_epochs=t.warmup_epochs, milestones=t.milestones, decay=t.lr_decay, min_lr=t.min_lr)
        set_learning_rate(self.optimizer, lr)
        self.method.on_epoch_start(epoch, self.loss_fn)
        self.method.set_train_mode(self.model)
        order = self.sampler.indices(epoch)
        world = self.dist.world_size
        gen = torch.Generator().manual_seed(_epoch_seed(t.seed, epoch))
        tic = time.time()
        loss_sum, seen, last_finite = 0.0, 0, None
        correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: no sync per step
        pending: list[tuple[int, int, torch.Tensor]] = []  # (step, batch size, loss) not yet read

        def read_losses() -> None:
            """Read the pending steps' losses (mean over processes) in one host sync, in step order:
            the non-finite-loss stop names the first bad step and the last finite loss before it."""
            nonlocal loss_sum, last_finite
            if not pending:
                return
            values = distributed.all_reduce_sum(torch.cat([p[2] for p in pending])).tolist()
            for (at, size, _), value in zip(pending, values):
                value /= world
                if not math.isfinite(value):
                    raise TrainingError(
                        f"non-finite loss ({value}) at epoch {epoch + 1}, step {at + 1}; last finite loss "
                        f"{'none' if last_finite is None else f'{last_finite:.6g}'} - lower train.lr or check the data"
                    )
                last_finite = value
                loss_sum += value * size
            pending.clear()
            bar.set_postfix(loss=f"{last_finite:.3f}", img_s=f"{seen / max(time.time() - tic, 1e-9):.0f}", refresh=False)

        bar.set_description(f"epoch {epoch + 1}/{t.epochs}")
        for step, start in enumerate(range(0, len(order), t.batch_size)):
            global_pos = order[start:start + t.batch_size]
            if self.views:  # the step's extra views, for the method (TrainBatches.views)
                images, target, self.batches.views = self.train_views(global_pos, gen, order)
            else:
                images, target = self.train_batch(global_pos, gen, order)
            self.batches.epoch, self.batches.step, self.batches.global_size = epoch, step, len(global_pos)
            if self.graph is not None:
                self.graph.begin_step()
            step_out = self.method.training_step(self.model, self.forward, images, target, self.loss_fn, gen)
            loss = step_out.loss
            pending.append((step, len(global_pos), loss.detach().reshape(1)))
            if len(pending) >= t.loss_check_every:  # every step by default: before the step's update
                read_losses()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.method.after_step(self.model)
            if self._sync_loss_statistics is not None:
                self._sync_loss_statistics()  # e.g. seesaw counts: sum the ranks' increments
            correct += (step_out.logits.detach().argmax(1) == step_out.target).sum()
            seen += len(global_pos)
            bar.update(len(global_pos))
        read_losses()  # the epoch's last steps
        correct = int(distributed.all_reduce_sum(correct.to(torch.float64).reshape(1)))
        seconds = time.time() - tic
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),  # 1-based: epochs done
               "train_top1": 100.0 * correct / max(seen, 1), "seconds": seconds, "images_per_s": seen / seconds}
        if self.graph is not None:  # how much of the epoch the graphs replayed (engine/graphs.py)
            row.update({f"graph_{k}": v for k, v in self.graph.counters().items()})
        return row

    def train_batch(self, global_pos: np.ndarray, generator: torch.Generator, order: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, target) on the device: this rank's share of the global batch at training
        positions `global_pos` (a last batch smaller than the number of processes is filled up from
        `order`, by default the batch itself), crops and flips drawn from `generator` for the whole
        global batch. Also a method's extra batches (`TrainBatches.fetch`)."""
        raw, target, shard = self._read(global_pos, order)
        return self.augment(raw, generator, shard), target

    def train_views(self, global_pos: np.ndarray, generator: torch.Generator, order: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(main view, target, extra views): `train_batch`'s images, then one view per name of
        `Method.views` of the same raw uint8 batch, each drawing from `generator` after the one
        before (for the whole global batch, as the main view). Also `TrainBatches.fetch_views`."""
        raw, target, shard = self._read(global_pos, order)
        images = self.augment(raw, generator, shard)
        return images, target, tuple(view(raw, generator, shard) for view in self.views)

    def _read(self, global_pos: np.ndarray, order: np.ndarray | None):
        """(raw uint8 (B, H, W, C), target, shard) of this rank's share of the global batch."""
        rank, world = self.dist.rank, self.dist.world_size
        pos = split_batch(global_pos, rank, world, np.resize(global_pos, world) if order is None else order)
        shard = (rank, world, max(len(global_pos), world))
        if self._resident is not None:
            rows = torch.from_numpy(np.ascontiguousarray(pos)).to(self.device)
            raw, target = self._resident[0][rows], self._resident[1][rows]
        else:
            raw = torch.from_numpy(self.data.train.batch(pos)).to(self.device)
            target = torch.from_numpy(self.data.train.labels[pos]).to(self.device)
        return raw, target, shard

    def ranks_identical(self) -> bool:
        """All ranks hold bitwise the same parameters (compared through a float64 fingerprint)."""
        with torch.no_grad():
            fp = torch.stack([p.double().sum() * (i + 1) for i, p in enumerate(self.model.parameters())]).sum()
        prints = distributed.all_gather_cat(fp.reshape(1))
        return bool((prints == prints[0]).all())

    def _evaluate(self, split) -> tuple[dict, dict]:
        """(metrics, arrays) of the model as it is now on one split, through the method's evaluate."""
        data, t, e = self.data, self.cfg.train, self.cfg.eval
        return self.method.evaluate(self.model, split, mean=data.mean, std=data.std, batch_size=t.eval_batch_size,
                                    device=self.device, channels_last=t.channels_last,
                                    many_threshold=e.many_threshold, few_threshold=e.few_threshold,
                                    rare_threshold=e.rare_threshold, ece_bins=e.ece_bins)

    def test_curve(self, epoch: int) -> dict:
        """train.test_curve_from: the test split's top-1 (and shot groups) after this epoch, as
        `test_curve_*` keys of metrics.jsonl. A diagnostic only: it measures how far the "best
        epoch on the test set" that some papers report (LDAM-DRW's official code prints its
        best_acc1 over epochs) lies above the last epoch, and nothing reads it to select a model
        or a hyper-parameter (best_val.pt comes from the validation split alone). {} when off or
        before the epoch it starts at."""
        start = self.cfg.train.test_curve_from
        if not start or epoch + 1 < start:
            return {}
        tm, _ = self._evaluate(self.data.test)
        return {f"test_curve_{k}": tm[k] for k in ("top1", "many", "medium", "few")}

    def validate(self, epoch: int) -> dict:
        """Validation metrics; saves best_val.pt when val top-1 improves. {} without a val split."""
        data = self.data
        if data.val is None or not len(data.val):
            return {}
        vm, arrays = self._evaluate(data.val)  # SSP: its own task's metrics
        if self.callbacks:  # class logits only (a pretext run's arrays are of its task)
            self.callbacks.call("on_validation", epoch + 1, vm, arrays if self.method.pretext is None else {})
        if vm["top1"] > self.best["top1"]:
            self.best = {"epoch": epoch, "top1": vm["top1"]}
            atomic_torch_save({"model": self.model.state_dict(), "epoch": epoch + 1, "val_top1": vm["top1"]},
                              self.rundir.best_val)
        return {f"val_{k}": vm[k] for k in ("top1", "many", "medium", "few")}

    def save(self, epoch: int) -> None:
        """Checkpoint after 0-idx `epoch`: last.pt, the previous last.pt kept as prev.pt."""
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch + 1,
            "best_val_epoch": self.best["epoch"], "best_val_top1": self.best["top1"],
            "torch_rng": torch.get_rng_state(), "config": self.cfg.to_dict(),
            "loss": self.loss_fn.state_dict(), "method": self.method.state_dict(),
            "class_counts": torch.as_tensor(self.data.class_counts),
        }
        self.rundir.save_checkpoint(state, keep_prev=self._last_is_sound)
        self._last_is_sound = True
        if epoch + 1 in self.cfg.train.save_epochs:  # a branch point other runs may start from
            atomic_torch_save(state, self.rundir.epoch_checkpoint(epoch + 1))


def fit(cfg: RunConfig, data: LTData, run_dir: str | Path, *, recipe: Recipe | None = None, resume: bool = False,
        branch_from=None, callbacks: list | None = None) -> dict:
    """Train per `cfg` (with the run's `recipe`, built once by the caller) into `run_dir`
    (continuing from its checkpoint with `resume`, or starting from another run's checkpoint
    with `branch_from`). `callbacks`: longtail.callbacks objects, after those the config names."""
    trainer = Trainer(cfg, data, run_dir, recipe=recipe, callbacks=callbacks)
    if resume:
        trainer.resume()
    elif branch_from is not None:
        trainer.branch(branch_from)
    return trainer.run()
