"""Prepared store: decoded images cached once as uint8 .npy files, memory-mapped on reuse.

Layout of one store folder (``<cache_dir>/<name>-<fingerprint>/``)::

    meta.json                  class names, source description, fingerprint, splits
    <split>_images.npy         (N, H, W, C) uint8
    <split>_labels.npy         (N,) int64

The fingerprint hashes the source path and, for every file, its relative path, size and
modification time (or the archive's size and mtime), plus the decoding options, so a
changed dataset is decoded again. A store is written into a temporary folder and renamed
into place, so an interrupted preparation never leaves a half store behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError


def default_cache_dir() -> Path:
    env = os.environ.get("LONGTAIL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "longtail"


def fingerprint(parts: list) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_store(folder: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    meta = json.loads((folder / "meta.json").read_text())
    splits = {}
    for split in meta["splits"]:
        images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(folder / f"{split}_labels.npy")
        splits[split] = (images, labels)
    return meta, splits


def prepared(cache_dir: str | Path | None, name: str, key: str,
             build: Callable[[], tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]]):
    """Return (meta, splits) from the store, building and saving it first if needed."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{name}-{key}"
    if (folder / "meta.json").is_file():
        try:
            return load_store(folder)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged store: rebuild below
    meta, splits = build()
    meta = {**meta, "fingerprint": key, "splits": sorted(splits)}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # mode 0o777 less the umask (tempfile.mkdtemp's 0o700 would hide a shared cache)
    except OSError as err:
        raise DataError(f"cannot write the prepared store in {root}: {err.strerror}; set data.cache_dir") from None
    try:
        for split, (images, labels) in splits.items():
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the prepared store in {root}: {err.strerror}; set data.cache_dir") from None
    return load_store(folder)
