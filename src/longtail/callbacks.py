"""Training callbacks: what the loop tells a logger (TensorBoard, MLflow, W&B, ...) after each epoch.

The protocol (duck-typed; subclass `Callback` for the no-op defaults):

    on_train_start(context)                 once, before the first epoch this session trains
    on_validation(epoch, metrics, arrays)   after each validation (runs with a validation split)
    on_epoch_end(epoch, row, context)       after each epoch, once its metrics.jsonl row and checkpoint are written
    on_train_end(context)                   once, after the last epoch (also when training stops on an error)

`epoch` counts the epochs done (1, 2, ...), as metrics.jsonl does. `row` is the epoch's
metrics.jsonl row (lr, train_loss, train_top1, val_top1 / many / medium / few, images_per_s,
seconds). `metrics` is the validation's full metrics dict (eval.metrics.compute_metrics: top1,
many / medium / few, per_class, ...); `arrays` holds its `logits` (N, C) and `labels` (N,)
as numpy arrays (empty for a pretext pre-training run, which validates on its own task).
`context` is a `CallbackContext`: the run folder, the config, class names and training
counts, the epochs and the first epoch of this session (after --resume or --branch-from).

Callbacks run on rank 0 only, under torch.no_grad(), and never see the model or the optimiser.
The global torch and numpy RNG states are restored after each call, so a callback cannot change
the loop's numbers. An exception in a callback stops training with a one-line TrainingError
naming it (the epoch's checkpoint is written first: `--resume` continues).

Callbacks come from `train.callbacks: ["pkg.module:Class", ...]` (each built with no
arguments) or from the Python API (`train_run(..., callbacks=[obj])`, `fit(..., callbacks=...)`);
`train.tensorboard: true` adds `TensorBoardCallback`, which writes RUN/tensorboard/.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .errors import ConfigError, LongtailError
from .rundir import RunDir

log = logging.getLogger(__name__)

TENSORBOARD_HINT = "pip install -e '.[tensorboard]'"
MAX_CONFUSION_CLASSES = 100  # above this, TensorBoard gets no confusion-matrix image (too large to read)


class CallbackError(LongtailError):
    """A training callback failed."""


@dataclass
class CallbackContext:
    """What a callback may know of the run (read-only by convention)."""

    run_dir: RunDir
    cfg: RunConfig
    class_names: list[str]
    class_counts: list[int]
    epochs: int
    start_epoch: int  # epochs done before this session (0 for a new run)
    extra: dict = field(default_factory=dict)


class Callback:
    """No-op defaults of the callback protocol; override what you need."""

    def on_train_start(self, context: CallbackContext) -> None:
        pass

    def on_validation(self, epoch: int, metrics: dict, arrays: dict) -> None:
        pass

    def on_epoch_end(self, epoch: int, row: dict, context: CallbackContext) -> None:
        pass

    def on_train_end(self, context: CallbackContext) -> None:
        pass


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def resolve_callback(spec: Any) -> type:
    """The class (or factory) named by 'pkg.module:Name'; a one-line ConfigError otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"train.callbacks: each entry must be 'package.module:Name', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"train.callbacks: cannot import {module_name!r} ({err})") from None
    target = getattr(module, attr, None)
    if target is None or not callable(target):
        raise ConfigError(f"train.callbacks: {module_name!r} has no callable {attr!r}")
    return target


def check_callbacks(cfg: RunConfig) -> None:
    """Fail before a run folder exists: train.tensorboard without the tensorboard package, or a
    train.callbacks entry that does not import."""
    if cfg.train.tensorboard and not tensorboard_available():
        raise ConfigError(f"train.tensorboard needs the tensorboard package: {TENSORBOARD_HINT}")
    if not isinstance(cfg.train.callbacks, list):
        raise ConfigError("train.callbacks must be a list of 'package.module:Name' strings")
    for spec in cfg.train.callbacks:
        resolve_callback(spec)


def build_callbacks(cfg: RunConfig, run_dir: RunDir, extra: list | None = None) -> list:
    """The run's callbacks: TensorBoard (train.tensorboard), then train.callbacks, then `extra` (Python API)."""
    check_callbacks(cfg)
    out: list = []
    if cfg.train.tensorboard:
        out.append(TensorBoardCallback(run_dir.tensorboard))
    out += [resolve_callback(spec)() for spec in cfg.train.callbacks]
    return out + list(extra or [])


class CallbackList:
    """Calls every callback's hook in order, guarded: no grad, RNG states restored, errors one line."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            numpy_state = np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    method(*args)
            except LongtailError:
                raise
            except Exception as err:  # noqa: BLE001 - reworded to one line naming the callback
                epoch = f" at epoch {args[0]}" if args and isinstance(args[0], int) else ""
                first = str(err).splitlines()[0] if str(err) else ""
                raise CallbackError(f"callback {type(cb).__name__}.{hook} failed{epoch}: {type(err).__name__}"
                                    f"{': ' + first if first else ''}") from err
            finally:
                np.random.set_state(numpy_state)

    def end_quietly(self, context: CallbackContext) -> None:
        """on_train_end after training failed: a callback's own error is logged, not raised."""
        try:
            self.call("on_train_end", context)
        except LongtailError as err:
            log.warning("%s", err)


# ----------------------------------------------------------------------------- TensorBoard


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_to_chw(fig) -> np.ndarray:
    from PIL import Image

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return image.transpose(2, 0, 1)  # (3, H, W) uint8


def confusion_image(logits: np.ndarray, labels: np.ndarray, class_counts, class_names) -> np.ndarray | None:
    """Row-normalised validation confusion matrix, classes head to tail, as a (3, H, W) image;
    None above MAX_CONFUSION_CLASSES classes."""
    C = logits.shape[1]
    if C > MAX_CONFUSION_CLASSES:
        return None
    preds = logits.argmax(1)
    cm = np.zeros((C, C))
    np.add.at(cm, (labels, preds), 1)
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    cm = cm[np.ix_(order, order)]
    rows = cm.sum(1, keepdims=True)
    cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(10.0, max(4.0, 0.3 * C + 2.0))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    img = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    if C <= 40:
        ax.set_xticks(range(C))
        ax.set_xticklabels([class_names[i] for i in order], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(C))
        ax.set_yticklabels([class_names[i] for i in order], fontsize=7)
    ax.set_xlabel("predicted class (head to tail)")
    ax.set_ylabel("true class (head to tail)")
    ax.set_title("validation confusion matrix (row-normalised)", fontsize=10)
    return _png_to_chw(fig)


def per_class_image(per_class: list, class_counts, class_names) -> np.ndarray:
    """Validation accuracy per class, head to tail, as a (3, H, W) image."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    C = len(order)
    values = [per_class[i] if per_class[i] is not None else np.nan for i in order]
    fig = _figure(min(14.0, max(6.0, 0.2 * C + 2.5)), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(C), values, width=0.9 if C <= 200 else 1.0, color="#1f77b4", linewidth=0)
    if C <= 40:
        ax.set_xticks(range(C))
        ax.set_xticklabels([class_names[i] for i in order], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("class rank, head to tail")
    ax.set_ylim(0, 100)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("per-class validation accuracy, head to tail", fontsize=10)
    return _png_to_chw(fig)


# metrics.jsonl key -> TensorBoard tag
SCALAR_TAGS = {"train_loss": "loss/train", "lr": "lr", "train_top1": "top1/train", "val_top1": "top1/val",
               "val_many": "val/many", "val_medium": "val/medium", "val_few": "val/few",
               "images_per_s": "speed/images_per_s"}


class TensorBoardCallback(Callback):
    """Event files in `log_dir` (RUN/tensorboard/): the SCALAR_TAGS scalars each epoch, and at each
    validation the per-class accuracy and (up to MAX_CONFUSION_CLASSES classes) the confusion
    matrix as images. Step = epochs done. On resume, events of the epochs after the checkpoint
    are purged (SummaryWriter's purge_step)."""

    def __init__(self, log_dir):
        self.log_dir = str(log_dir)
        self.writer = None
        self._context: CallbackContext | None = None

    def on_train_start(self, context: CallbackContext) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"train.tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
        self._context = context
        self.writer = SummaryWriter(self.log_dir, purge_step=context.start_epoch + 1 if context.start_epoch else None)

    def on_validation(self, epoch: int, metrics: dict, arrays: dict) -> None:
        if self.writer is None or self._context is None or "per_class" not in metrics:
            return
        ctx = self._context
        self.writer.add_image("val/per_class_accuracy",
                              per_class_image(metrics["per_class"], ctx.class_counts, ctx.class_names), epoch)
        if "logits" in arrays and "labels" in arrays:
            image = confusion_image(np.asarray(arrays["logits"]), np.asarray(arrays["labels"]), ctx.class_counts,
                                    ctx.class_names)
            if image is not None:
                self.writer.add_image("val/confusion_matrix", image, epoch)

    def on_epoch_end(self, epoch: int, row: dict, context: CallbackContext) -> None:
        if self.writer is None:
            return
        for key, tag in SCALAR_TAGS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()

    def on_train_end(self, context: CallbackContext) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
