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

from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .profiles import class_counts as profile_counts
from .sources import SOURCE_LOADERS, RawData, arrays_to_raw


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

    def summary(self) -> str:
        c = self.class_counts
        lines = [
            f"data: {self.description}",
            f"  classes {self.num_classes}, train {len(self.train)} (max {c.max()}, min {c.min()}, "
            f"ratio {self.imbalance_ratio:.1f}), val {0 if self.val is None else len(self.val)}, test {len(self.test)}",
        ]
        return "\n".join(lines)


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


def build_data(cfg: DataConfig, *, arrays: dict | None = None, progress: bool = False) -> LTData:
    """Load, subsample to the long-tail profile, split; see the module docstring."""
    if cfg.source == "arrays":
        if arrays is None:
            raise ConfigError("data.source 'arrays' is only available from Python: build_data(cfg, arrays={...})")
        raw = arrays_to_raw(arrays)
    else:
        raw = SOURCE_LOADERS[cfg.source](cfg, progress)
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
        if len(cfg.counts) != C:
            raise ConfigError(f"config key 'data.counts' has {len(cfg.counts)} entries, the data has {C} classes")
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
    for key, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ConfigError(f"config key 'data.{key}' has {len(v)} values, the images have {channels} channels")
    counts = np.bincount(train.labels, minlength=C).astype(np.int64)
    return LTData(train=train, val=val, test=test, class_counts=counts, class_names=list(names),
                  source_counts=available, mean=tuple(mean), std=tuple(std), description=raw.description)
