"""From a DataConfig to LTData: load the source, make the long tail, split off validation.

Subsampling follows LDAM-DRW's `gen_imbalanced_data` exactly: a `RandomState(seed)`
shuffles each class's indices in class-index order and the first n_c are kept, so the
CIFAR pickles source yields LDAM-DRW's own subset at seed 0. The balanced validation split
(`val_per_class` = k) takes k images per class from the images the subset left out; a
class whose leftovers are fewer than k (the head class, which keeps everything) gives the
shortfall from the end of its own subset, so its training count drops by that much
(CIFAR-10-LT at ratio 100 with k = 20: 12,406 - 20 = 12,386 training images).
`class_counts` is computed here, once, from the final training labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..rundir import RunDir
from .profiles import class_counts as profile_counts
from .sources import RawData, load_arrays, source_loader

log = logging.getLogger(__name__)


@dataclass
class Split:
    """A view on a (possibly memory-mapped) image array: rows `index`, labels aligned."""

    images: np.ndarray  # (N_source, H, W, C) uint8
    index: np.ndarray  # (N,) int64 rows of `images`
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, positions: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) images at positions 0..N-1 of this split."""
        return np.ascontiguousarray(self.images[self.index[positions]])


@dataclass
class LTData:
    train: Split
    val: Split | None
    test: Split
    class_counts: np.ndarray  # (C,) training images per class, after the validation split
    class_names: list[str]
    source_counts: np.ndarray  # (C,) training images per class available in the source
    mean: tuple
    std: tuple
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.train.images.shape[1]), int(self.train.images.shape[2])

    @property
    def imbalance_ratio(self) -> float:
        return float(self.class_counts.max() / max(self.class_counts.min(), 1))

    @property
    def info(self) -> "DataInfo":
        """What a trained run needs of its data once the images are gone (data.json)."""
        return DataInfo(class_names=list(self.class_names), class_counts=np.asarray(self.class_counts),
                        source_counts=np.asarray(self.source_counts), mean=tuple(self.mean), std=tuple(self.std),
                        image_shape=self.image_shape, channels=self.channels, description=self.description,
                        num_train=len(self.train), num_val=0 if self.val is None else len(self.val),
                        num_test=len(self.test))

    def summary(self) -> str:
        c = self.class_counts
        lines = [
            f"data: {self.description}",
            f"  classes {self.num_classes}, train {len(self.train)} (max {c.max()}, min {c.min()}, "
            f"ratio {self.imbalance_ratio:.1f}), val {0 if self.val is None else len(self.val)}, test {len(self.test)}",
        ]
        return "\n".join(lines)


@dataclass
class DataInfo:
    """A run's data without its images: enough to rebuild, run and report its network.

    Written to the run folder as data.json (`to_json`) and read back (`from_json`); every
    method builds its network from it as from `LTData` (same attribute names).
    """

    class_names: list
    class_counts: np.ndarray  # (C,) training images per class
    source_counts: np.ndarray  # (C,) training images per class available in the source
    mean: tuple
    std: tuple
    image_shape: tuple  # (H, W)
    channels: int
    description: str = ""
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict:
        return {"description": self.description, "class_names": list(self.class_names),
                "class_counts": [int(v) for v in self.class_counts],
                "source_counts": [int(v) for v in self.source_counts],
                "num_train": int(self.num_train), "num_val": int(self.num_val), "num_test": int(self.num_test),
                "mean": list(self.mean), "std": list(self.std), "image_shape": list(self.image_shape),
                "channels": int(self.channels)}

    @classmethod
    def from_json(cls, info: dict) -> "DataInfo":
        counts = np.asarray(info["class_counts"], dtype=np.int64)
        return cls(class_names=list(info["class_names"]), class_counts=counts,
                   source_counts=np.asarray(info.get("source_counts", counts), dtype=np.int64),
                   mean=tuple(info["mean"]), std=tuple(info["std"]), image_shape=tuple(info["image_shape"]),
                   channels=int(info["channels"]), description=info.get("description", ""),
                   num_train=int(info.get("num_train", 0)), num_val=int(info.get("num_val", 0)),
                   num_test=int(info.get("num_test", 0)))


def _resolve_order(order, class_names: list[str]) -> np.ndarray:
    if order is None:
        return np.arange(len(class_names))
    index = {n: i for i, n in enumerate(class_names)}
    out = []
    for item in order:
        if isinstance(item, str) and item in index:
            out.append(index[item])
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(class_names):
            out.append(item)
        else:
            raise ConfigError(f"config key 'data.class_order': unknown class {item!r}")
    if sorted(out) != list(range(len(class_names))):
        raise ConfigError("config key 'data.class_order' must list every class exactly once")
    return np.asarray(out)


def _carve_test(raw: RawData, cfg: DataConfig) -> RawData:
    """For sources without a test split: a balanced test set of test_per_class per class."""
    k = cfg.test_per_class
    rs = np.random.RandomState(cfg.seed + 1_000_003)
    test_idx, train_idx = [], []
    for c in range(len(raw.class_names)):
        idx = np.where(raw.train_labels == c)[0]
        if len(idx) <= k:
            raise DataError(
                f"class '{raw.class_names[c]}' has {len(idx)} images, not enough for a balanced test "
                f"split of {k} per class plus training images; lower data.test_per_class"
            )
        rs.shuffle(idx)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    raw.test_images, raw.test_labels = raw.train_images, raw.train_labels[te]
    raw.extra["test_index"] = te
    raw.extra["train_index"] = tr
    return raw


def _channel_stats(images: np.ndarray, index: np.ndarray, seed: int) -> tuple[tuple, tuple]:
    rs = np.random.RandomState(seed)
    pick = np.sort(rs.choice(index, size=min(len(index), 10_000), replace=False))
    x = np.asarray(images[pick], dtype=np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _warn_classes_without_test_images(test_labels: np.ndarray, class_names: list[str]) -> None:
    """Log one warning per class that has training images but no test images (eval/metrics.py)."""
    support = np.bincount(test_labels, minlength=len(class_names))
    for c in np.flatnonzero(support == 0):
        log.warning("class '%s' has training images but no test images: its test accuracy will be "
                    "undefined (null in %s) and left out of the mean and shot-group accuracies",
                    class_names[c], RunDir.EVAL)


def _check_channels(mean, std, channels: int) -> None:
    for key, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ConfigError(f"config key 'data.{key}' has {len(v)} values, the images have {channels} channels")


def _check_counts_length(cfg: DataConfig, num_classes: int) -> None:
    if cfg.profile == "counts" and len(cfg.counts) != num_classes:
        raise ConfigError(f"config key 'data.counts' has {len(cfg.counts)} entries, the data has {num_classes} classes")


def stand_in_data(cfg: DataConfig) -> LTData:
    """An LTData that reads no image, for `longtail validate`: the source's probe (its path checks
    and error messages, its class names and channels; data/sources.py) with the profile's class
    counts, every row pointing at one blank image. Components build on it as on the real data.

    A source without a probe (digits: cheap; arrays: Python only; one registered elsewhere) is
    built for real. What only the images tell is not checked: unreadable or odd-sized files, and
    a class that the real subsampling would leave without images.
    """
    loader = source_loader(cfg.source)
    probe = getattr(loader, "probe", None)
    if probe is None:
        return build_data(cfg)
    found = probe(cfg)
    names, channels = list(found.class_names), found.channels
    _check_counts_length(cfg, len(names))
    order = _resolve_order(cfg.class_order, names)
    head = cfg.max_count or found.head_count or 100
    if cfg.profile == "counts":
        counts = np.asarray(cfg.counts, dtype=np.int64)
    elif cfg.profile == "none":
        counts = np.full(len(names), head, dtype=np.int64)
    else:
        counts = np.zeros(len(names), dtype=np.int64)
        counts[order] = profile_counts(cfg.profile, len(names), head, cfg.imbalance_ratio,
                                       step_fraction=cfg.step_fraction, pareto_shape=cfg.pareto_shape)
    counts = np.maximum(counts, 1)
    side = cfg.image_size or found.image_size or 32
    blank = np.zeros((1, side, side, channels), dtype=np.uint8)

    def split(per_class) -> Split:
        labels = np.repeat(np.arange(len(names)), per_class).astype(np.int64)
        return Split(blank, np.zeros(len(labels), dtype=np.int64), labels)

    mean = tuple(cfg.mean) if cfg.mean is not None else (0.5,) * channels
    std = tuple(cfg.std) if cfg.std is not None else (0.25,) * channels
    _check_channels(mean, std, channels)
    out = LTData(train=split(counts), val=split(cfg.val_per_class) if cfg.val_per_class else None,
                 test=split(cfg.test_per_class), class_counts=counts, class_names=names, source_counts=counts,
                 mean=mean, std=std, description=f"{cfg.source} (stand-in: no image read)")
    return restrict_classes(out, cfg.class_subset)


def build_data(cfg: DataConfig, *, arrays: dict | None = None, progress: bool = False) -> LTData:
    """Load, subsample to the long-tail profile, split; see the module docstring."""
    loader = source_loader(cfg.source)  # an unknown data.source: ConfigError naming the registered ones
    raw = load_arrays(cfg, progress, arrays=arrays) if loader is load_arrays else loader(cfg, progress)
    names = raw.class_names
    C = len(names)
    if len(raw.train_labels) == 0:
        raise DataError(f"no training images in {raw.description}")
    if raw.test_images is None:
        raw = _carve_test(raw, cfg)
    pool = raw.extra.get("train_index", np.arange(len(raw.train_labels)))
    pool_labels = raw.train_labels[pool]
    available = np.bincount(pool_labels, minlength=C)
    for c in range(C):
        if available[c] == 0:
            raise DataError(f"class '{names[c]}' has no training images in {raw.description}")

    order = _resolve_order(cfg.class_order, names)
    if cfg.profile == "none":
        target = available.copy()
    elif cfg.profile == "counts":
        _check_counts_length(cfg, C)
        target = np.asarray(cfg.counts, dtype=np.int64)
        for c in range(C):
            if target[c] > available[c]:
                raise DataError(f"class '{names[c]}' needs {target[c]} training images (data.counts) "
                                f"but has {available[c]}")
    else:
        n_max = cfg.max_count if cfg.max_count is not None else int(available[order[0]])
        by_rank = profile_counts(cfg.profile, C, n_max, cfg.imbalance_ratio,
                                 step_fraction=cfg.step_fraction, pareto_shape=cfg.pareto_shape)
        target = np.zeros(C, dtype=np.int64)
        target[order] = by_rank
        for c in range(C):
            if target[c] > available[c]:
                raise DataError(
                    f"class '{names[c]}' needs {target[c]} training images for the '{cfg.profile}' profile "
                    f"but has {available[c]}; lower data.max_count"
                )
            if target[c] == 0:
                raise DataError(
                    f"class '{names[c]}' is left with zero training images after subsampling "
                    f"(n_max {n_max}, imbalance ratio {cfg.imbalance_ratio:g}); lower the ratio"
                )

    use_source_val = raw.val_images is not None
    rs = np.random.RandomState(cfg.seed)
    train_rows, val_rows = [], []
    for c in range(C):
        idx = pool[pool_labels == c]
        rs.shuffle(idx)
        keep, rest = idx[: target[c]], idx[target[c]:]
        k = 0 if use_source_val else cfg.val_per_class
        if k:
            val = rest[:k]
            short = k - len(val)
            if short > 0:
                val = np.concatenate([val, keep[len(keep) - short:]])
                keep = keep[: len(keep) - short]
            if len(keep) == 0:
                raise DataError(
                    f"class '{names[c]}' is left with zero training images after taking "
                    f"{k} validation images; lower data.val_per_class"
                )
            val_rows.append(val)
        train_rows.append(keep)
    train_index = np.sort(np.concatenate(train_rows))
    train = Split(raw.train_images, train_index, raw.train_labels[train_index])
    if use_source_val:
        val = Split(raw.val_images, np.arange(len(raw.val_labels)), np.asarray(raw.val_labels, dtype=np.int64))
        if len(val) and val.labels.max() >= C:
            raise DataError(f"label {val.labels.max()} out of range [0, {C}) in the validation split")
    elif val_rows:
        vi = np.sort(np.concatenate(val_rows))
        val = Split(raw.train_images, vi, raw.train_labels[vi])
    else:
        val = None
    if "test_index" in raw.extra:
        ti = raw.extra["test_index"]
        test = Split(raw.test_images, ti, raw.test_labels)
    else:
        test = Split(raw.test_images, np.arange(len(raw.test_labels)), np.asarray(raw.test_labels, dtype=np.int64))
    if len(test) == 0:
        raise DataError(f"no test images in {raw.description}")
    _warn_classes_without_test_images(test.labels, names)
    if raw.test_images.shape[1:] != raw.train_images.shape[1:]:
        raise DataError(
            f"test images are {raw.test_images.shape[1:3]} but training images {raw.train_images.shape[1:3]}; "
            "set data.image_size"
        )

    channels = raw.train_images.shape[3]
    if cfg.mean is not None or cfg.std is not None:
        mean = tuple(cfg.mean) if cfg.mean is not None else raw.mean
        std = tuple(cfg.std) if cfg.std is not None else raw.std
        if mean is None or std is None:
            raise ConfigError("set both data.mean and data.std for this source")
    elif raw.mean is not None:
        mean, std = raw.mean, raw.std
    else:
        mean, std = _channel_stats(raw.train_images, train_index, cfg.seed)
    _check_channels(mean, std, channels)
    counts = np.bincount(train.labels, minlength=C).astype(np.int64)
    out = LTData(train=train, val=val, test=test, class_counts=counts, class_names=list(names),
                 source_counts=available, mean=tuple(mean), std=tuple(std), description=raw.description)
    return restrict_classes(out, cfg.class_subset)


def class_subset_index(subset, class_names: list[str]) -> np.ndarray:
    """data.class_subset as sorted class indices of the full data (names or indices)."""
    index = {n: i for i, n in enumerate(class_names)}
    out = []
    for item in subset:
        if isinstance(item, str) and item in index:
            out.append(index[item])
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(class_names):
            out.append(item)
        else:
            raise ConfigError(f"config key 'data.class_subset': unknown class {item!r} "
                              f"(the data has {len(class_names)} classes)")
    if len(set(out)) != len(out):
        raise ConfigError("config key 'data.class_subset' names a class twice")
    return np.asarray(sorted(out), dtype=np.int64)


def restrict_classes(data: LTData, subset) -> LTData:
    """`data` cut to the classes of `subset` (data.class_subset; None: unchanged), after the long-tail
    subsampling and the validation split, so a class keeps exactly the images it has in the full run
    (an LFME expert trains on its class subset of the student's data). The kept classes are relabelled
    0..k-1 in class-index order and keep their names; mean / std stay those of the full data (the
    expert sees the student's normalisation)."""
    if subset is None:
        return data
    keep = class_subset_index(subset, data.class_names)
    new_label = np.full(data.num_classes, -1, dtype=np.int64)
    new_label[keep] = np.arange(len(keep))

    def cut(split: Split | None) -> Split | None:
        if split is None:
            return None
        rows = np.flatnonzero(new_label[split.labels] >= 0)
        return Split(split.images, split.index[rows], new_label[split.labels[rows]])

    names = [data.class_names[i] for i in keep]
    return LTData(train=cut(data.train), val=cut(data.val), test=cut(data.test),
                  class_counts=data.class_counts[keep].copy(), class_names=names,
                  source_counts=data.source_counts[keep].copy(), mean=data.mean, std=data.std,
                  description=f"{data.description} (classes {', '.join(names)})")
