"""Frozen features of a trained run, extracted once and reused by every feature-level tool.

`extract_features(run_dir)` runs the run's network (eval mode, the run's normalisation, no
augmentation) over the training, validation and test splits and returns per split

    features  (N, D) float32   pooled pre-logit features (`forward_head(f, pre_logits=True)`)
    logits    (N, C) float32   the run's own head on those features
    labels    (N,)   int64

plus the training class counts, class names and, for a linear or cosine head, its weight
(C, D) (and bias (C,) when it has one). The result is cached in
``RUN_DIR/features/<checkpoint>.npz`` (written atomically); the cache is keyed by the
checkpoint file's size and modification time, so retraining or resuming the run refreshes
it. Users: DLSA, NCM-style analyses, similarity modelling (SWRM), weight-norm analysis,
t-SNE figures. Command line: ``longtail features RUN_DIR``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .rundir import CHECKPOINT_CHOICES, RunDir

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features of one run and checkpoint; `splits[name]` = {"features", "logits", "labels"}."""

    splits: dict[str, dict[str, np.ndarray]]
    class_counts: np.ndarray
    class_names: list[str]
    head: dict[str, np.ndarray] = field(default_factory=dict)  # "weight" (C, D), optional "bias" (C,)
    epoch: int = 0
    path: Path | None = None
    from_cache: bool = False  # read from a fresh cache (nothing extracted)

    def __getitem__(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.splits:
            raise ConfigError(f"no '{split}' features in {self.path or 'this feature set'} "
                              f"(have: {', '.join(self.splits) or 'none'})")
        return self.splits[split]

    @property
    def dim(self) -> int:
        return int(next(iter(self.splits.values()))["features"].shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _stamp(path: Path) -> np.ndarray:
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def _load_cache(cache: Path, stamp: np.ndarray) -> FeatureSet | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if not np.array_equal(z["stamp"], stamp):
                return None
            splits = {s: {k: z[f"{s}_{k}"] for k in ("features", "logits", "labels")}
                      for s in SPLITS if f"{s}_features" in z}
            head = {k: z[f"head_{k}"] for k in ("weight", "bias") if f"head_{k}" in z}
            return FeatureSet(splits=splits, class_counts=z["class_counts"], class_names=z["class_names"].tolist(),
                              head=head, epoch=int(z["epoch"]), path=cache, from_cache=True)
    except (OSError, KeyError, ValueError):
        return None  # unreadable or old cache: extract again


def extract_features(run_dir: str | Path, *, checkpoint: str = "last", device: str | None = None,
                     refresh: bool = False, arrays: dict | None = None,
                     cache_dir: str | Path | None = None) -> FeatureSet:
    """Features of every split of a trained run (module docstring), from the cache when fresh.

    `arrays` supplies the images of a run trained on in-memory arrays (data.source 'arrays').
    `cache_dir` keeps the cache there instead of RUN_DIR/features (a run folder that must stay
    untouched); a fresh cache already in RUN_DIR/features is still read.
    """
    from .runlock import lock_if_inside

    run = RunDir(run_dir).require()
    ckpt = run.require_checkpoint(checkpoint)
    stamp = _stamp(ckpt)
    own = run.features_cache(checkpoint)
    cache = own if cache_dir is None else Path(cache_dir) / own.name
    if not refresh:
        for candidate in dict.fromkeys((own, cache)):
            if (hit := _load_cache(candidate, stamp)) is not None:
                return hit
    run_dir = run.path
    with lock_if_inside(cache, run_dir):  # the default cache is written into the run folder: one writer
        return _extract(run_dir, checkpoint, ckpt, stamp, cache, device=device, arrays=arrays)


def _extract(run_dir: Path, checkpoint: str, ckpt: Path, stamp: np.ndarray, cache: Path, *, device,
             arrays) -> FeatureSet:
    """extract_features without the cache look-up: run the network, write the cache."""
    import torch

    from .data.build import build_data
    from .eval.predict import predict
    from .models.heads import NormedLinear
    from .dist import resolve_device
    from .io import atomic_write_bytes
    from .runmodel import load_run_model

    run = RunDir(run_dir)
    cfg = run.read_config()
    data = build_data(cfg.data, arrays=arrays)
    dev = resolve_device(device or cfg.train.device)
    model, epoch, _ = load_run_model(run, which=checkpoint, device=dev, cfg=cfg, info=data.info)
    kw = dict(mean=data.mean, std=data.std, batch_size=cfg.train.eval_batch_size, device=dev, features=True,
              channels_last=cfg.train.channels_last)
    splits = {}
    for name in SPLITS:
        split = getattr(data, name)
        if split is None or len(split) == 0:
            continue
        log.info("features: %s (%d images) with %s checkpoint of %s", name, len(split), checkpoint, run_dir)
        out = predict(model, split, **kw)
        splits[name] = {"features": out["features"], "logits": out["logits"], "labels": out["labels"]}
    head = {}
    module = model.head
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        if isinstance(module, NormedLinear):  # stores (D, C)
            weight = weight.t()
        head["weight"] = weight.detach().float().cpu().numpy()
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            head["bias"] = module.bias.detach().float().cpu().numpy()
    result = FeatureSet(splits=splits, class_counts=np.asarray(data.class_counts, dtype=np.int64),
                        class_names=list(data.class_names), head=head, epoch=epoch, path=cache)
    arrays = {f"{s}_{k}": v for s, d in splits.items() for k, v in d.items()}
    arrays.update({f"head_{k}": v for k, v in head.items()})
    buffer = io.BytesIO()
    np.savez(buffer, stamp=stamp, epoch=np.int64(epoch), class_counts=result.class_counts,
             class_names=np.asarray(result.class_names, dtype=str), **arrays)
    atomic_write_bytes(cache, buffer.getvalue())  # creates its folder; a failure is one line
    return result


def _cmd_features(args) -> int:
    fs = extract_features(args.run_dir, checkpoint=args.checkpoint, device=args.device, refresh=args.refresh)
    for name, d in fs.splits.items():
        print(f"{name:<5} features {tuple(d['features'].shape)}  logits {tuple(d['logits'].shape)}")
    head = f", head weight {tuple(fs.head['weight'].shape)}" if "weight" in fs.head else ""
    print(f"epoch {fs.epoch}{head}; cached in {fs.path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("features", help="extract a run's frozen features (train / val / test) to "
                                        "RUN_DIR/features/<checkpoint>.npz, reused by feature-level tools")
    p.add_argument("run_dir", help="a trained run folder")
    p.add_argument("--checkpoint", choices=sorted(CHECKPOINT_CHOICES), default="last")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    p.add_argument("--refresh", action="store_true", help="extract again even when the cache is fresh")
    p.set_defaults(func=_cmd_features)
