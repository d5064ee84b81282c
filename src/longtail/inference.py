"""`longtail.load(RUN_DIR)`: a trained run as a ready classifier for new images.

    >>> import longtail
    >>> model = longtail.load("runs/ce")                       # doctest: +SKIP
    >>> pred = model.predict(["cat.jpg", pil_image, uint8_array])  # doctest: +SKIP
    >>> pred.top_classes[0], pred.top_probs[0]                   # doctest: +SKIP

The network is rebuilt from the run's config.yaml and data.json and its checkpoint is
loaded weights-only; no training data is read. Inputs get the run's own preprocessing
(`longtail.preprocess`). `predict` applies post-hoc logit adjustment toward a target
label distribution (`longtail.logit_adjust`). The default, prior 'auto', adjusts toward a
uniform prior only a run trained toward its training prior (plain CE, instance sampling); a
run trained with re-balancing (balanced softmax, LA loss, DRW, a class-balanced sampler,
decoupled classifiers, ...) already aims at balanced classes and is left as it is ('train'):
adjusting it again would correct for the training prior twice (`auto_prior`). A LADE run's logits
are calibrated to a uniform prior by training: adjustment starts from uniform (logits + log
pi_target, the official LADE inference) and 'auto' is 'uniform', which leaves them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .errors import CheckpointError, ConfigError, DataError
from .logit_adjust import NAMED_PRIORS, adjust_logits, check_tau, logit_prior_name, resolve_prior
from .data.build import DataInfo
from .methods import build_method
from .methods.base import logits_prior
from .registry import LOSSES, METHODS
from .rundir import RunDir
from .runmodel import load_run_model
from .preprocess import ImageSpec, to_model_input
from .dist import resolve_device

AUTO_PRIOR = "auto"


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

    def choose_prior(self, prior="auto") -> tuple[object, str | None]:
        """(the prior to use, why): 'auto' -> `auto_prior(self.config)`; any other prior as given,
        with why None. A name that is not a prior nor a file is a one-line error."""
        if isinstance(prior, str) and prior == AUTO_PRIOR:
            return auto_prior(self.config)
        if isinstance(prior, (str, Path)) and str(prior) not in NAMED_PRIORS and not Path(prior).is_file():
            raise DataError(f"prior must be {AUTO_PRIOR}, {', '.join(NAMED_PRIORS)} or a file; no such file: {prior}")
        return prior, None

    def target_shift(self, prior="auto") -> tuple[np.ndarray, np.ndarray]:
        """(pi_source, pi_target), both (C,) float64, for `prior` ('auto': `choose_prior`; the others:
        `logit_adjust`). pi_source is the training prior, or uniform for a run whose loss trains
        logits calibrated to a uniform prior (LADE: `logit_adjust.source_prior`), or the prior its method
        states (SADE: `methods.base.logits_prior`)."""
        prior = self.choose_prior(prior)[0]
        pi_target = resolve_prior(prior, class_names=self.class_names, class_counts=self.class_counts)
        return logits_prior(self.config, self.class_counts), pi_target

    def predict(self, images, *, k: int = 5, prior="auto", tau: float = 1.0, batch_size: int = 256) -> Prediction:
        """Top-k classes with probabilities per image, after post-hoc logit adjustment.

        Args:
            images: a path, PIL image, uint8 array or tensor, a batch, or a list of them.
            k: number of classes per image (capped at C).
            prior: target label distribution: 'auto' (default: 'uniform' for a run trained
                toward its training prior, 'train' for a re-balanced run; `choose_prior` says
                which and why), 'uniform', 'train' (no change), a prior file, or C non-negative
                weights in class order.
            tau: adjustment strength; adjusted = logit + tau * (log pi_target - log pi_source),
                pi_source the training prior (uniform for a LADE run: `target_shift`).
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


def _rebalancing(registry, name: str) -> bool:
    """The `rebalancing` class attribute of a registered loss or method (False for a name no
    longer registered: a run folder may outlive a component)."""
    return name in registry and bool(getattr(registry.get(name), "rebalancing", False))


def rebalanced_training(cfg: RunConfig | None) -> str | None:
    """Why a run's training already aimed at balanced classes (a uniform prior would adjust
    twice), or None (plain CE, instance sampling). Losses and methods say it themselves with
    their `rebalancing` class attribute; crt / lws re-balance through their sampler."""
    if cfg is None:
        return None
    reasons = []
    if _rebalancing(LOSSES, cfg.loss.name):
        reasons.append(f"loss {cfg.loss.name}")
    if cfg.reweight.scheme != "none":
        reasons.append(f"reweight {cfg.reweight.scheme}")
    if cfg.sampler.name != "instance":
        reasons.append(f"sampler {cfg.sampler.name}")
    if _rebalancing(METHODS, cfg.method.name):
        reasons.append(f"method {cfg.method.name}")
    return ", ".join(reasons) or None


def auto_prior(cfg: RunConfig | None) -> tuple[str, str]:
    """What prior 'auto' means for a run, and why (one clause): 'uniform' (no adjustment) for a run
    whose loss trains uniform-calibrated logits (LADE, `logit_adjust.logit_prior_name`); 'train'
    (no adjustment) when its training re-balanced (`rebalanced_training`); 'uniform' otherwise."""
    if logit_prior_name(cfg) == "uniform":
        return "uniform", (f"the run's loss ({cfg.loss.name}) trains logits calibrated to a uniform prior "
                           "(post-compensated), so they are left as they are")
    why = rebalanced_training(cfg)
    if why:
        return "train", f"the run was trained with re-balancing ({why}), so its logits are left as they are"
    if cfg is None:
        return "uniform", "no run config: taken as trained toward its training prior"
    return "uniform", (f"the run was trained toward its training prior (loss {cfg.loss.name}, instance sampling, "
                       "no re-weighting), so it is adjusted to balanced classes")


def load(run_dir: str | Path, *, checkpoint: str = "last", device: str = "auto") -> Predictor:
    """A trained run folder -> a `Predictor` (eval mode) on `device` (cpu, cuda, cuda:N, auto).

    `checkpoint`: 'last' (checkpoints/last.pt; checkpoints/prev.pt, with a logged warning, where
    last.pt fails its integrity check) or 'best_val' (checkpoints/best_val.pt,
    only when the run had a validation split).
    """
    run = RunDir(run_dir).require()
    run.checkpoint(checkpoint)  # a valid choice
    cfg = run.read_config()
    info = run.read_data_info()
    data_info = DataInfo.from_json(info)
    method = build_method(cfg, data_info)
    if method.pretext is not None:
        raise CheckpointError(f"method '{cfg.method.name}' is a pre-training run whose head predicts "
                              f"{method.pretext}s, not classes: use a run fine-tuned from it (model.weights)")
    dev = resolve_device(device)
    model, epoch, path = load_run_model(run, which=checkpoint, device=dev, cfg=cfg, info=data_info,
                                        action="loading")  # a corrupt last.pt: prev.pt, with a logged warning
    run_dir = run.path
    return Predictor(model=model, class_names=info["class_names"], class_counts=info["class_counts"],
                     spec=ImageSpec.from_data_info(info), device=dev, config=cfg, run_dir=run_dir,
                     checkpoint=path, epoch=epoch)
