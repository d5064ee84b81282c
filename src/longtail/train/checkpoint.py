"""Atomic writes and safe loading of checkpoints and run files.

Every file is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target, so a crash leaves either the old or the new file, never a torn
one. Checkpoints are torch's zip format; loading first verifies every record's CRC-32
(`zipfile.testzip`), then unpickles with `torch.load(weights_only=True)`, which refuses
any object whose unpickling would run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, LongtailError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LongtailError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (a torn last line is dropped when the log is read back)."""
    try:
        with open(path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")
    except OSError as err:
        raise LongtailError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | Path) -> Any:
    """Load a torch file: integrity-checked, weights only, onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint is truncated or corrupt: {path} ({err})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint is corrupt (CRC mismatch in {bad}): {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects whose unpickling would run code "
            f"(only weights-only files are accepted): {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint is truncated or corrupt: {path} ({str(err).splitlines()[0]})") from None
