"""Dataset sources: each turns a DataConfig into a RawData (full, not yet long-tailed).

Sources and what `data.root` points to:

- ``cifar10`` / ``cifar100``: the python pickles (`cifar-10-batches-py`,
  `cifar-100-python`), the folder itself or its parent. Read with a restricted
  unpickler that only rebuilds numpy arrays.
- ``imagefolder``: `train/<class>/*` and `test/<class>/*` (optional `val/<class>/*`),
  JPEG/PNG/..., as a folder or a .tar/.tar.gz/.tgz archive read without unpacking.
  Class names are the sorted train sub-folder names.
- ``idx``: MNIST-format files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or `.gz`).
- ``split_list``: ImageNet-LT / Places-LT lists, ``relative/path label`` per line, given
  as `data.train_list` / `data.val_list` / `data.test_list`, paths relative to `data.root`.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no file needed); the
  balanced test split takes `data.test_per_class` images per class.
- ``arrays``: numpy arrays given in Python (`build_data(cfg, arrays={...})`).

Decoded image sources (imagefolder, split_list) go through the prepared store.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .images import decode_many, is_image_name
from .store import fingerprint, prepared

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # LDAM-DRW's widely copied values, kept for comparability


@dataclass
class RawData:
    """A full dataset before long-tail subsampling. Images are (N, H, W, C) uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    mean: tuple | None = None
    std: tuple | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


def _need_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root is required for source '{cfg.source}'")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset path does not exist: {root}")
    if not os.access(root, os.R_OK):
        raise DataError(f"dataset path is not readable: {root}")
    return root


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"label {bad} out of range [0, {num_classes}) in {where}")
    return labels


# ------------------------------------------------------------------------------ CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path} is not a valid CIFAR pickle: {err}") from None


def _cifar_folder(root: Path, name: str) -> Path:
    for cand in (root, root / name):
        if cand.is_dir() and (cand / ("test_batch" if name.startswith("cifar-10-") else "test")).is_file():
            return cand
    raise DataError(f"no {name} folder (CIFAR python pickles) found at {root}")


def _cifar_images(d: dict, path: Path) -> np.ndarray:
    data = np.asarray(d.get(b"data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected data of shape (N, 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)


def load_cifar10(cfg: DataConfig, progress: bool = False) -> RawData:
    folder = _cifar_folder(_need_root(cfg), "cifar-10-batches-py")
    xs, ys = [], []
    for i in range(1, 6):
        d = _unpickle(folder / f"data_batch_{i}")
        xs.append(_cifar_images(d, folder / f"data_batch_{i}"))
        ys.append(np.asarray(d[b"labels"]))
    test = _unpickle(folder / "test_batch")
    names = [n.decode() for n in _unpickle(folder / "batches.meta")[b"label_names"]]
    return RawData(np.concatenate(xs), _check_labels(np.concatenate(ys), 10, str(folder)),
                   _cifar_images(test, folder / "test_batch"),
                   _check_labels(test[b"labels"], 10, str(folder / "test_batch")), names,
                   mean=CIFAR_MEAN, std=CIFAR_STD, description=f"CIFAR-10 pickles at {folder}")


def load_cifar100(cfg: DataConfig, progress: bool = False) -> RawData:
    folder = _cifar_folder(_need_root(cfg), "cifar-100-python")
    train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
    names = [n.decode() for n in _unpickle(folder / "meta")[b"fine_label_names"]]
    return RawData(_cifar_images(train, folder / "train"),
                   _check_labels(train[b"fine_labels"], 100, str(folder / "train")),
                   _cifar_images(test, folder / "test"),
                   _check_labels(test[b"fine_labels"], 100, str(folder / "test")), names,
                   mean=CIFAR_MEAN, std=CIFAR_STD, description=f"CIFAR-100 pickles at {folder}")


# ------------------------------------------------------------------------ ImageFolder


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _folder_entries(root: Path) -> dict[str, list[tuple[str, Path, int, int]]]:
    """{split: [(relative path, path, size, mtime_ns)]} for train/val/test."""
    out = {}
    for split in ("train", "val", "test"):
        base = root / split
        if not base.is_dir():
            continue
        entries = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(root).as_posix()
                try:
                    st = p.stat()
                except OSError as err:
                    raise DataError(f"cannot read image {rel}: {err.strerror}") from None
                entries.append((rel, p, st.st_size, st.st_mtime_ns))
        out[split] = sorted(entries)
    return out


def _class_of(rel: str) -> tuple[str, str] | None:
    parts = rel.split("/")
    if len(parts) != 3:
        return None
    return parts[0], parts[1]


def _imagefolder_build(root: Path, cfg: DataConfig, progress: bool):
    archive = _is_archive(root)
    items: dict[str, list[tuple[str, object]]] = {}
    if archive:
        try:
            with tarfile.open(root, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    rel = member.name.lstrip("./")
                    sc = _class_of(rel)
                    if sc is None or sc[0] not in ("train", "val", "test") or not is_image_name(rel):
                        continue
                    fh = tar.extractfile(member)
                    items.setdefault(sc[0], []).append((rel, fh.read() if fh else b""))
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot read archive {root}: {err}") from None
    else:
        for split, entries in _folder_entries(root).items():
            items[split] = [(rel, str(p)) for rel, p, _, _ in entries if is_image_name(rel) and _class_of(rel)]
    if "train" not in items:
        raise DataError(f"no train/<class>/<image> files found in {root}")
    train_dirs = root / "train"
    class_names = sorted({_class_of(rel)[1] for rel, _ in items["train"]})
    if not archive and train_dirs.is_dir():
        for d in sorted(p for p in train_dirs.iterdir() if p.is_dir()):
            if d.name not in class_names:
                raise DataError(f"class '{d.name}' has no images in {d}")
    index = {n: i for i, n in enumerate(class_names)}
    splits = {}
    for split, its in items.items():
        its = sorted(its, key=lambda t: t[0])
        labels = []
        for rel, _ in its:
            cls = _class_of(rel)[1]
            if cls not in index:
                raise DataError(f"class '{cls}' of {split}/ has no images in train/ ({root})")
            labels.append(index[cls])
        images = decode_many(its, channels=3, size=cfg.image_size, from_paths=not archive,
                             progress=progress, desc=f"decoding {split}")
        splits[split] = (images, np.asarray(labels, dtype=np.int64))
    return {"class_names": class_names, "description": f"ImageFolder at {root}"}, splits


def load_imagefolder(cfg: DataConfig, progress: bool = False) -> RawData:
    root = _need_root(cfg).resolve()
    if _is_archive(root):
        st = root.stat()
        parts = ["imagefolder-archive", str(root), st.st_size, st.st_mtime_ns]
    elif root.is_dir():
        parts = ["imagefolder", str(root)] + [(rel, size, mt) for entries in _folder_entries(root).values()
                                            for rel, _, size, mt in entries]
    else:
        raise DataError(f"data.root for imagefolder must be a folder or a .tar/.tar.gz archive: {root}")
    key = fingerprint(parts + [cfg.image_size, 3])
    meta, splits = prepared(cfg.cache_dir, "imagefolder", key, lambda: _imagefolder_build(root, cfg, progress))
    return _raw_from_store(meta, splits)


def _raw_from_store(meta: dict, splits: dict) -> RawData:
    train = splits["train"]
    test = splits.get("test", (None, None))
    val = splits.get("val", (None, None))
    return RawData(train[0], train[1], test[0], test[1], list(meta["class_names"]),
                   val_images=val[0], val_labels=val[1], description=meta.get("description", ""))


# -------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one MNIST IDX file (raw or gzipped) into a numpy array."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path} is truncated or padded: {len(body)} bytes of data, expected {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        for cand in (root / name, root / stem.replace("-idx", ".idx")):
            if cand.is_file():
                return cand
    return None


def load_idx(cfg: DataConfig, progress: bool = False) -> RawData:
    root = _need_root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root for idx must be a folder: {root}")
    arrays = {}
    for key, stem in (("train_images", "train-images-idx3-ubyte"), ("train_labels", "train-labels-idx1-ubyte"),
                      ("test_images", "t10k-images-idx3-ubyte"), ("test_labels", "t10k-labels-idx1-ubyte")):
        path = _find_idx(root, stem)
        if path is None:
            if key.startswith("test"):
                arrays[key] = None
                continue
            raise DataError(f"missing IDX file {stem}[.gz] in {root}")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x is None:
            continue
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"IDX {split} images {x.shape} and labels {y.shape} do not match")
        arrays[f"{split}_images"] = np.asarray(x, dtype=np.uint8)[:, :, :, None]
    num_classes = int(max(arrays["train_labels"].max(), -1 if arrays["test_labels"] is None else arrays["test_labels"].max())) + 1
    names = [str(i) for i in range(num_classes)]
    return RawData(arrays["train_images"], _check_labels(arrays["train_labels"], num_classes, "train labels"),
                   arrays["test_images"],
                   None if arrays["test_labels"] is None else _check_labels(arrays["test_labels"], num_classes, "test labels"),
                   names, description=f"IDX files at {root}")


# ------------------------------------------------------------------------- split list


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """Parse `relative/path label` lines (blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read split list {path}: {err.strerror}") from None
    out = []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{no}: expected 'relative/path label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{path}:{no}: label {parts[1]!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{path}:{no}: label {label} out of range (negative)")
        out.append((parts[0], label))
    if not out:
        raise DataError(f"split list {path} has no entries")
    return out


def load_split_list(cfg: DataConfig, progress: bool = False) -> RawData:
    root = _need_root(cfg).resolve()
    if not cfg.train_list:
        raise DataError("data.train_list is required for source 'split_list'")
    lists = {}
    for split in ("train", "val", "test"):
        p = getattr(cfg, f"{split}_list")
        if p:
            p = Path(p).expanduser()
            if not p.is_file():
                raise DataError(f"split list not found: {p}")
            lists[split] = read_split_list(p)
    parts = ["split_list", str(root), cfg.image_size]
    for split, entries in sorted(lists.items()):
        for rel, label in entries:
            path = root / rel
            try:
                st = path.stat()
            except OSError:
                raise DataError(f"image listed in data.{split}_list does not exist: {path}") from None
            parts.append((split, rel, label, st.st_size, st.st_mtime_ns))
    num_classes = max(label for entries in lists.values() for _, label in entries) + 1

    def build():
        splits = {}
        for split, entries in lists.items():
            images = decode_many([(rel, str(root / rel)) for rel, _ in entries], channels=3,
                                 size=cfg.image_size, from_paths=True, progress=progress,
                                 desc=f"decoding {split}")
            splits[split] = (images, np.asarray([label for _, label in entries], dtype=np.int64))
        return {"class_names": [str(i) for i in range(num_classes)],
                "description": f"split lists under {root}"}, splits

    meta, splits = prepared(cfg.cache_dir, "split_list", fingerprint(parts), build)
    return _raw_from_store(meta, splits)


# ----------------------------------------------------------------------------- digits


def load_digits(cfg: DataConfig, progress: bool = False) -> RawData:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, :, :, None]
    return RawData(images, bunch.target.astype(np.int64), None, None, [str(i) for i in range(10)],
                   description="scikit-learn digits (8x8)")


def arrays_to_raw(arrays: dict) -> RawData:
    """RawData from {'train_images', 'train_labels'[, 'test_images', 'test_labels', 'class_names']}.

    Images: (N, H, W) or (N, H, W, C) uint8 (C = 1 or 3).
    """
    if not isinstance(arrays, dict) or "train_images" not in arrays or "train_labels" not in arrays:
        raise DataError("source 'arrays' needs arrays={'train_images': ..., 'train_labels': ...}")
    unknown = set(arrays) - {"train_images", "train_labels", "test_images", "test_labels", "class_names"}
    if unknown:
        raise DataError(f"unknown arrays key(s): {', '.join(sorted(unknown))}")

    def images(x, name):
        if x is None:
            return None
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, :, :, None]
        if x.ndim != 4 or x.shape[3] not in (1, 3):
            raise DataError(f"{name} must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), got {x.shape}")
        if x.dtype != np.uint8:
            raise DataError(f"{name} must be uint8, got {x.dtype}")
        return x

    tr_x, te_x = images(arrays["train_images"], "train_images"), images(arrays.get("test_images"), "test_images")
    tr_y = np.asarray(arrays["train_labels"])
    te_y = None if arrays.get("test_labels") is None else np.asarray(arrays["test_labels"])
    if len(tr_x) != len(tr_y):
        raise DataError(f"train_images ({len(tr_x)}) and train_labels ({len(tr_y)}) differ in length")
    if (te_x is None) != (te_y is None) or (te_x is not None and len(te_x) != len(te_y)):
        raise DataError("test_images and test_labels must be given together, with equal lengths")
    names = arrays.get("class_names")
    num_classes = len(names) if names is not None else int(max(tr_y.max(), -1 if te_y is None else te_y.max())) + 1
    names = list(names) if names is not None else [str(i) for i in range(num_classes)]
    return RawData(tr_x, _check_labels(tr_y, num_classes, "train_labels"), te_x,
                   None if te_y is None else _check_labels(te_y, num_classes, "test_labels"), names,
                   description="numpy arrays")


SOURCE_LOADERS = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "idx": load_idx,
    "split_list": load_split_list,
    "digits": load_digits,
}
