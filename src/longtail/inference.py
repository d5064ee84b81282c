"""`longtail.load(RUN_DIR)`: a trained run as a ready classifier for new images.

    >>> import longtail
    >>> model = longtail.load("runs/ce")                       # doctest: +SKIP
    >>> pred = model.predict(["cat.jpg", pil_image, uint8_array])  # doctest: +SKIP
    >>> pred.top_classes[0], pred.top_probs[0]                   # doctest: +SKIP

The network is rebuilt from the run's config.yaml and data.json and its checkpoint is
loaded weights-only; no training data is read. Inputs get the run's own preprocessing
(`longtail.preprocess`). `predict` applies post-hoc logit adjustment toward a target
label distribution (`longtail.logit_adjust`, uniform by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .config import RunConfig
from .errors import CheckpointError, ConfigError, LongtailError
from .logit_adjust import adjust_logits, check_tau, resolve_prior, train_prior
from .models import build_model
from .preprocess import ImageSpec, to_model_input
from .runs import load_run_config
from .train.checkpoint import safe_torch_load
from .train.loop import BEST_VAL, CHECKPOINT, resolve_device

CHECKPOINTS = {"last": CHECKPOINT, "best_val": BEST_VAL}
DATA_KEYS = ("class_names", "class_counts", "image_shape", "channels", "mean", "std")


@dataclass
class Prediction:
    """What `Predictor.predict` returns for B images and C classes (k = top-k)."""

    logits: np.ndarray  # (B, C) float32, after logit adjustment
    probs: np.ndarray  # (B, C) float32, softmax of `logits`
    top_indices: np.ndarray  # (B, k) int64, most probable first
    top_probs: np.ndarray  # (B, k) float32
    top_classes: list[list[str]]  # (B, k) class names

    @property
    def labels(self) -> list[str]:
        """Top-1 class name per image."""
        return [row[0] for row in self.top_classes]


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    return k


def read_data_info(run_dir: Path) -> dict:
    path = run_dir / "data.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"run folder {run_dir} has no data.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    missing = [k for k in DATA_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    if len(info["class_names"]) != len(info["class_counts"]):
        raise CheckpointError(f"{path}: class_names and class_counts differ in length")
    return info


class Predictor:
    """A trained network with its run's preprocessing, class names and training counts.

    Attributes: `model` (eval mode), `class_names`, `class_counts` (C,), `spec`
    (`ImageSpec`: channels, height, width, mean, std), `device`, `config`, `run_dir`,
    `checkpoint` (path), `epoch`.
    """

    def __init__(self, *, model: torch.nn.Module, class_names: list[str], class_counts, spec: ImageSpec,
                 device: torch.device, config: RunConfig | None = None, run_dir: Path | None = None,
                 checkpoint: Path | None = None, epoch: int = 0):
        if len(class_names) != len(class_counts):
            raise ValueError("class_names and class_counts differ in length")
        self.model = model.eval()
        self.class_names = list(class_names)
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.spec, self.device, self.config = spec, device, config
        self.run_dir, self.checkpoint, self.epoch = run_dir, checkpoint, epoch

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, images) -> torch.Tensor:
        """Images -> normalised float (B, C, H, W) on the device (`longtail.preprocess`)."""
        return to_model_input(images, self.spec, self.device)

    @torch.no_grad()
    def _run(self, images, batch_size: int, pre_logits: bool) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        x = self.preprocess(images)
        out = []
        for start in range(0, x.shape[0], batch_size):
            f = self.model.forward_features(x[start:start + batch_size])
            out.append(self.model.forward_head(f, pre_logits=pre_logits).float().cpu())
        return torch.cat(out)

    def logits(self, images, *, batch_size: int = 256) -> torch.Tensor:
        """The network's raw logits, float32 (B, C) on the CPU (no adjustment)."""
        return self._run(images, batch_size, pre_logits=False)

    def features(self, images, *, batch_size: int = 256) -> torch.Tensor:
        """Pooled pre-logit features, float32 (B, D) on the CPU (`forward_head(pre_logits=True)`)."""
        return self._run(images, batch_size, pre_logits=True)

    def target_shift(self, prior="uniform") -> tuple[np.ndarray, np.ndarray]:
        """(pi_train, pi_target), both (C,) float64, for `prior` (see `logit_adjust`)."""
        pi_target = resolve_prior(prior, class_names=self.class_names, class_counts=self.class_counts)
        return train_prior(self.class_counts), pi_target

    def predict(self, images, *, k: int = 5, prior="uniform", tau: float = 1.0, batch_size: int = 256) -> Prediction:
        """Top-k classes with probabilities per image, after post-hoc logit adjustment.

        Args:
            images: a path, PIL image, uint8 array or tensor, a batch, or a list of them.
            k: number of classes per image (capped at C).
            prior: target label distribution: 'uniform' (default), 'train' (no change),
                a prior file, or C non-negative weights in class order.
            tau: adjustment strength; adjusted = logit + tau * (log pi_target - log pi_train).
        """
        k = min(check_k(k), self.num_classes)
        tau = check_tau(tau)
        pi_train, pi_target = self.target_shift(prior)
        logits = adjust_logits(self.logits(images, batch_size=batch_size), pi_train=pi_train,
                               pi_target=pi_target, tau=tau)
        probs = torch.softmax(logits, dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        return Prediction(logits=logits.numpy(), probs=probs.numpy(), top_indices=top_i.numpy(),
                          top_probs=top_p.numpy(),
                          top_classes=[[self.class_names[i] for i in row] for row in top_i.tolist()])


def _fit(model: torch.nn.Module, state) -> str | None:
    """Load state["model"] into model; the first line of the error, or None when it fits."""
    try:
        model.load_state_dict(state["model"])
        return None
    except (KeyError, TypeError, RuntimeError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__


def rebuild_model(cfg: RunConfig, info: dict, state, path: Path) -> torch.nn.Module:
    """The run's network with the checkpoint's weights.

    First `models.build_model` from the config (no file but the checkpoint is read). A
    method that replaces the head (lws, tau_norm, ncm, ...) saves weights that do not fit
    it; then the method's own `build_model` is used, with a stand-in for the data that
    carries only the class count, channels and training counts. Such a method may read
    files its config names (e.g. method.params.stage1) while building.
    """
    C, channels = len(info["class_names"]), int(info["channels"])
    model = build_model(cfg.model.name, num_classes=C, in_channels=channels, head=cfg.model.head,
                        params=cfg.model.params)
    error = _fit(model, state)
    if error is not None and cfg.method.name != "standard":
        from .methods import build_method

        stand_in = SimpleNamespace(num_classes=C, channels=channels, class_names=list(info["class_names"]),
                                   class_counts=np.asarray(info["class_counts"], dtype=np.int64),
                                   mean=tuple(info["mean"]), std=tuple(info["std"]), train=None, val=None, test=None)
        try:
            model = build_method(cfg, stand_in).build_model()
        except LongtailError as err:
            raise CheckpointError(f"cannot rebuild the network of method '{cfg.method.name}' for {path}: "
                                  f"{str(err).splitlines()[0]}") from None
        error = _fit(model, state)
    if error is not None:
        raise CheckpointError(f"{path} does not fit the run's model: {error}")
    return model


# Components whose optimum already aims at balanced classes (a uniform prior would adjust twice).
REBALANCING_LOSSES = ("class_balanced", "cb_sigmoid", "cb_focal", "balanced_softmax", "logit_adjustment", "ldam",
                      "softmax_eql", "seesaw")
REBALANCING_METHODS = ("tau_norm", "ncm")  # crt / lws re-balance through their sampler


def rebalanced_training(cfg: RunConfig | None) -> str | None:
    """Why a run's training already aimed at balanced classes, or None (plain CE, instance sampling)."""
    if cfg is None:
        return None
    reasons = []
    if cfg.loss.name in REBALANCING_LOSSES:
        reasons.append(f"loss {cfg.loss.name}")
    if cfg.reweight.scheme != "none":
        reasons.append(f"reweight {cfg.reweight.scheme}")
    if cfg.sampler.name != "instance":
        reasons.append(f"sampler {cfg.sampler.name}")
    if cfg.method.name in REBALANCING_METHODS:
        reasons.append(f"method {cfg.method.name}")
    return ", ".join(reasons) or None


def load(run_dir: str | Path, *, checkpoint: str = "last", device: str = "auto") -> Predictor:
    """A trained run folder -> a `Predictor` (eval mode) on `device` (cpu, cuda, cuda:N, auto).

    `checkpoint`: 'last' (checkpoints/last.pt) or 'best_val' (checkpoints/best_val.pt,
    only when the run had a validation split).
    """
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    cfg = load_run_config(run_dir)
    info = read_data_info(run_dir)
    path = run_dir / CHECKPOINTS[checkpoint]
    if checkpoint == "best_val" and not path.is_file():
        raise CheckpointError(f"no best_val checkpoint in {run_dir} (the run had no validation split)")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (train it first)")
    dev = resolve_device(device)
    state = safe_torch_load(path)
    model = rebuild_model(cfg, info, state, path)
    return Predictor(model=model.to(dev), class_names=info["class_names"], class_counts=info["class_counts"],
                     spec=ImageSpec.from_data_info(info), device=dev, config=cfg, run_dir=run_dir,
                     checkpoint=path, epoch=int(state.get("epoch", 0)))
