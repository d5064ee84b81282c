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

Labels: sources without class names (idx, split_list, arrays without `class_names`) take
their classes from the training labels, 0 to the largest; a validation or test label
outside that range is an error that names the label, the file and its index or line
(docs/data.md), never a class "without training images".
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError, did_you_mean
from ..registry import SOURCES
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


@dataclass
class SourceProbe:
    """What a source tells without decoding an image (`longtail validate`): its class names and
    image channels; where known cheaply, the head class's available training count and the image
    side."""

    class_names: list[str]
    channels: int
    head_count: int | None = None
    image_size: int | None = None


def with_probe(probe):
    """Give a source loader a `.probe(cfg) -> SourceProbe`: the loader's own path checks (the same
    one-line errors) and its class count, reading lists, labels or file names but no image. A
    source without one is loaded for real by `longtail validate` (data.build.stand_in_data)."""

    def attach(loader):
        loader.probe = probe
        return loader

    return attach


def _need_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root is required for source '{cfg.source}'")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset path does not exist: {root}")
    if not os.access(root, os.R_OK):
        raise DataError(f"dataset path is not readable: {root}")
    return root


def _check_labels(labels, num_classes: int, where: str, *, lines: list[int] | None = None) -> np.ndarray:
    """Labels as int64, each in [0, num_classes); else a DataError naming the first bad label and
    its place: `label L out of range [0, C) in WHERE (index i)`, or with `lines` (a split
    list's line numbers) `WHERE:LINE: label L out of range [0, C)`."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        if lines is not None:
            raise DataError(f"{where}:{lines[i]}: label {labels[i]} out of range [0, {num_classes})")
        raise DataError(f"label {labels[i]} out of range [0, {num_classes}) in {where} (index {i})")
    return labels


def _classes_from_labels(labels, where: str, *, lines: list[int] | None = None) -> int:
    """C for a source whose classes are its labels: one more than the largest training label.

    Every class 0..C-1 needs a training image, so a gap is an error that also names the
    largest label and where it is (a stray large label is the usual cause)."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.size == 0:
        return 0
    top = int(np.argmax(labels))
    num_classes = int(labels[top]) + 1
    _check_labels(labels, num_classes, where, lines=lines)  # negative labels
    missing = np.setdiff1d(np.arange(num_classes), labels)
    if len(missing):
        at = f"{where}:{lines[top]}" if lines is not None else f"{where} (index {top})"
        raise DataError(f"class '{missing[0]}' has no training images in {where}: classes are numbered by label "
                        f"from 0 to the largest training label, {num_classes - 1} at {at}")
    return num_classes


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


def _probe_cifar(cfg: DataConfig, folder_name: str, meta: str, key: bytes) -> SourceProbe:
    folder = _cifar_folder(_need_root(cfg), folder_name)
    names = [n.decode() for n in _unpickle(folder / meta)[key]]
    return SourceProbe(names, 3, head_count=50_000 // max(len(names), 1), image_size=32)


@SOURCES.register("cifar10")
@with_probe(lambda cfg: _probe_cifar(cfg, "cifar-10-batches-py", "batches.meta", b"label_names"))
def load_cifar10(cfg: DataConfig, progress: bool = False) -> RawData:
    """CIFAR-10 python pickles (cifar-10-batches-py), 10 classes, 50,000 train / 10,000 test."""
    folder = _cifar_folder(_need_root(cfg), "cifar-10-batches-py")
    xs, ys = [], []
    for i in range(1, 6):
        d = _unpickle(folder / f"data_batch_{i}")
        xs.append(_cifar_images(d, folder / f"data_batch_{i}"))
        ys.append(_check_labels(d[b"labels"], 10, str(folder / f"data_batch_{i}")))
    test = _unpickle(folder / "test_batch")
    names = [n.decode() for n in _unpickle(folder / "batches.meta")[b"label_names"]]
    return RawData(np.concatenate(xs), np.concatenate(ys),
                   _cifar_images(test, folder / "test_batch"),
                   _check_labels(test[b"labels"], 10, str(folder / "test_batch")), names,
                   mean=CIFAR_MEAN, std=CIFAR_STD, description=f"CIFAR-10 pickles at {folder}")


@SOURCES.register("cifar100")
@with_probe(lambda cfg: _probe_cifar(cfg, "cifar-100-python", "meta", b"fine_label_names"))
def load_cifar100(cfg: DataConfig, progress: bool = False) -> RawData:
    """CIFAR-100 python pickles (cifar-100-python), 100 fine classes, 50,000 train / 10,000 test."""
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
    class_names = sorted({_class_of(rel)[1] for rel, _ in items["train"]})
    if not archive:
        _check_class_folders(root, class_names)
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


def _check_class_folders(root: Path, class_names: list[str]) -> None:
    """Every folder under root/train is a class with images (else a DataError naming it)."""
    train_dirs = root / "train"
    if train_dirs.is_dir():
        for d in sorted(p for p in train_dirs.iterdir() if p.is_dir()):
            if d.name not in class_names:
                raise DataError(f"class '{d.name}' has no images in {d}")


def _probe_imagefolder(cfg: DataConfig) -> SourceProbe:
    """Class names from the train/<class>/<image> names (an archive's member list; nothing decoded)."""
    root = _need_root(cfg).resolve()
    if _is_archive(root):
        try:
            with tarfile.open(root, "r:*") as tar:
                names = [m.name.lstrip("./") for m in tar if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot read archive {root}: {err}") from None
    elif root.is_dir():
        names = [rel for rel, _, _, _ in _folder_entries(root).get("train", [])]
    else:
        raise DataError(f"data.root for imagefolder must be a folder or a .tar/.tar.gz archive: {root}")
    per_class: dict[str, int] = {}
    for rel in names:
        sc = _class_of(rel)
        if sc is not None and sc[0] == "train" and is_image_name(rel):
            per_class[sc[1]] = per_class.get(sc[1], 0) + 1
    if not per_class:
        raise DataError(f"no train/<class>/<image> files found in {root}")
    class_names = sorted(per_class)
    if not _is_archive(root):
        _check_class_folders(root, class_names)
    return SourceProbe(class_names, 3, head_count=max(per_class.values()), image_size=cfg.image_size)


@SOURCES.register("imagefolder")
@with_probe(_probe_imagefolder)
def load_imagefolder(cfg: DataConfig, progress: bool = False) -> RawData:
    """train/<class>/* and test/<class>/* (optional val/) image files, a folder or a tar archive."""
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


def _missing_idx(root: Path, stem: str) -> str:
    return f"missing IDX file {stem}[.gz] in {root}"


def _probe_idx(cfg: DataConfig) -> SourceProbe:
    """Classes from the training labels file (the image files are only looked for)."""
    root = _need_root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root for idx must be a folder: {root}")
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        if _find_idx(root, stem) is None:
            raise DataError(_missing_idx(root, stem))
    path = _find_idx(root, "train-labels-idx1-ubyte")
    labels = read_idx(path)
    num_classes = _classes_from_labels(labels, str(path))
    return SourceProbe([str(i) for i in range(num_classes)], 1,
                       head_count=int(np.bincount(np.asarray(labels, dtype=np.int64)).max()))


@SOURCES.register("idx")
@with_probe(_probe_idx)
def load_idx(cfg: DataConfig, progress: bool = False) -> RawData:
    """MNIST-format IDX files (train-/t10k- images and labels, raw or .gz)."""
    root = _need_root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root for idx must be a folder: {root}")
    arrays, paths = {}, {}
    for key, stem in (("train_images", "train-images-idx3-ubyte"), ("train_labels", "train-labels-idx1-ubyte"),
                      ("test_images", "t10k-images-idx3-ubyte"), ("test_labels", "t10k-labels-idx1-ubyte")):
        path = _find_idx(root, stem)
        if path is None:
            if key.startswith("test"):
                arrays[key] = None
                continue
            raise DataError(_missing_idx(root, stem))
        arrays[key], paths[key] = read_idx(path), path
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x is None:
            continue
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"IDX {split} images {x.shape} and labels {y.shape} do not match")
        arrays[f"{split}_images"] = np.asarray(x, dtype=np.uint8)[:, :, :, None]
    num_classes = _classes_from_labels(arrays["train_labels"], str(paths["train_labels"]))
    test_labels = arrays["test_labels"]
    if test_labels is not None:
        test_labels = _check_labels(test_labels, num_classes, str(paths["test_labels"]))
    return RawData(arrays["train_images"], np.asarray(arrays["train_labels"], dtype=np.int64), arrays["test_images"],
                   test_labels, [str(i) for i in range(num_classes)], description=f"IDX files at {root}")


# ------------------------------------------------------------------------- split list


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """Parse `relative/path label` lines (blank lines and # comments skipped)."""
    return [(rel, label) for _, rel, label in _split_list_lines(path)]


def _split_list_lines(path: Path) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) per entry of a split list (read_split_list)."""
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
        out.append((no, parts[0], label))
    if not out:
        raise DataError(f"split list {path} has no entries")
    return out


def _read_split_lists(cfg: DataConfig) -> tuple[Path, dict[str, list[tuple[str, int]]], int]:
    """(data.root, {split: [(relative path, label)]}, number of classes) of the configured lists,
    labels checked (the classes are the training labels; val / test labels must be among them)."""
    root = _need_root(cfg).resolve()
    if not cfg.train_list:
        raise DataError("data.train_list is required for source 'split_list'")
    lists, num_classes = {}, 0
    for split in ("train", "val", "test"):
        p = getattr(cfg, f"{split}_list")
        if p:
            p = Path(p).expanduser()
            if not p.is_file():
                raise DataError(f"split list not found: {p}")
            entries = _split_list_lines(p)
            lines, labels = [no for no, _, _ in entries], [label for _, _, label in entries]
            if split == "train":
                num_classes = _classes_from_labels(labels, str(p), lines=lines)
            else:
                _check_labels(labels, num_classes, str(p), lines=lines)
            lists[split] = [(rel, label) for _, rel, label in entries]
    return root, lists, num_classes


def _probe_split_list(cfg: DataConfig) -> SourceProbe:
    """Classes from the lists (the listed images are neither opened nor looked up)."""
    _, lists, num_classes = _read_split_lists(cfg)
    counts = np.bincount([label for _, label in lists["train"]], minlength=num_classes)
    return SourceProbe([str(i) for i in range(num_classes)], 3, head_count=int(counts.max()),
                       image_size=cfg.image_size)


@SOURCES.register("split_list")
@with_probe(_probe_split_list)
def load_split_list(cfg: DataConfig, progress: bool = False) -> RawData:
    """ImageNet-LT / Places-LT split lists: 'relative/path label' per line, paths under data.root."""
    root, lists, num_classes = _read_split_lists(cfg)
    parts = ["split_list", str(root), cfg.image_size]
    for split, entries in sorted(lists.items()):
        for rel, label in entries:
            path = root / rel
            try:
                st = path.stat()
            except OSError:
                raise DataError(f"image listed in data.{split}_list does not exist: {path}") from None
            parts.append((split, rel, label, st.st_size, st.st_mtime_ns))

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


@SOURCES.register("digits")
def load_digits(cfg: DataConfig, progress: bool = False) -> RawData:
    """scikit-learn's bundled 8x8 digits (1,797 images, no file needed)."""
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
    num_classes = len(names) if names is not None else _classes_from_labels(tr_y, "train_labels")
    names = list(names) if names is not None else [str(i) for i in range(num_classes)]
    return RawData(tr_x, _check_labels(tr_y, num_classes, "train_labels"), te_x,
                   None if te_y is None else _check_labels(te_y, num_classes, "test_labels"), names,
                   description="numpy arrays")


@SOURCES.register("arrays")
def load_arrays(cfg: DataConfig, progress: bool = False, *, arrays: dict | None = None) -> RawData:
    """numpy arrays given in Python: build_data(cfg, arrays={...}) (arrays_to_raw)."""
    if arrays is None:
        raise ConfigError("data.source 'arrays' is only available from Python: build_data(cfg, arrays={...})")
    return arrays_to_raw(arrays)


def source_loader(name: str):
    """The loader registered as data.source `name`; a one-line ConfigError naming the key, the
    registered sources and the closest name otherwise (config.py, on the ground floor, cannot
    know them, so the source is checked here, before any run folder exists)."""
    if name not in SOURCES:
        names = SOURCES.names()
        raise ConfigError(f"config key 'data.source' must be one of {', '.join(names)}, got '{name}'"
                          f"{did_you_mean(name, names)}")
    return SOURCES.get(name)
