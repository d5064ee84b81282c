"""Atomic writes and safe loading of checkpoints and run files.

Every file is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target, so a crash leaves either the old or the new file, never a torn
one. Checkpoints are torch's zip format; loading first verifies every record's CRC-32
(`zipfile.testzip`), then unpickles with `torch.load(weights_only=True)`, which refuses
any object whose unpickling would run code. `keep_previous` keeps the checkpoint being
replaced under a second name, and `load_with_fallback` loads that one where the newest fails
its integrity check.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import pickle
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LongtailError

log = logging.getLogger(__name__)


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file `.NAME.<random>.tmp` beside `path`, open for writing.

    It is created with mode 0o666 less the umask, as a plain open() would create `path`
    (tempfile.mkstemp's 0o600 would make every run file private to its owner); O_EXCL
    keeps the name ours.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (module docstring); any OSError is a one-line LongtailError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _open_temp(path)
    except OSError as err:
        raise LongtailError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _cannot_write(path, tmp, err) from None


def _cannot_write(path: Path, tmp: Path, err: OSError) -> LongtailError:
    """The one-line error of a failed write, once its temporary file is removed."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return LongtailError(f"cannot write {path}: {err.strerror or err}")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _non_finite(obj: Any, where: str = "") -> str | None:
    """Where in `obj` the first NaN / infinity is (e.g. `best_val.per_class[3]`), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((found for key, v in items if (found := _non_finite(v, key)) is not None), None)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as strict JSON (RFC 8259): a NaN or infinity is refused, never written.

    Undefined numbers are written as null by their producers; a non-finite float reaching
    this writer is a one-line error naming the file and the key, and leaves the old file.
    """
    try:
        text = json.dumps(obj, indent=1, allow_nan=False)
    except ValueError as err:
        if "Out of range float" not in str(err):  # e.g. a circular reference: a bug, not data
            raise
        raise LongtailError(f"cannot write {path}: {_non_finite(obj)} is not a finite number "
                            "(JSON has no NaN or infinity)") from None
    atomic_write_text(path, text + "\n")


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


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is empty, truncated or fails its CRC check; `reason` says which."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


def safe_torch_load(path: str | Path) -> Any:
    """Load a torch file: integrity-checked, weights only, onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint is empty (0 bytes): {path}", reason="empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CorruptCheckpointError(f"checkpoint is truncated or corrupt: {path} ({err})",
                                     reason=f"truncated or corrupt: {err}") from None
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint is corrupt (CRC mismatch in {bad}): {path}",
                                     reason=f"CRC mismatch in {bad}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects whose unpickling would run code "
            f"(only weights-only files are accepted): {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        detail = str(err).splitlines()[0]
        raise CorruptCheckpointError(f"checkpoint is truncated or corrupt: {path} ({detail})",
                                     reason=f"truncated or corrupt: {detail}") from None


def load_with_fallback(path: str | Path, previous: str | Path | None, *, action: str,
                       warn: bool = True) -> tuple[Any, Path]:
    """(state, the path it came from): `path`, or `previous` where `path` is empty, truncated or
    fails its CRC check and `previous` exists; then one warning is logged (unless `warn` is
    False), e.g. "RUN/checkpoints/last.pt failed its integrity check (...); resuming from
    RUN/checkpoints/prev.pt (epoch E)" for action "resuming from". A file refused as unsafe
    never falls back."""
    path = Path(path)
    try:
        return safe_torch_load(path), path
    except CorruptCheckpointError as err:
        if previous is None or not Path(previous).is_file():
            raise
        first = err
    previous = Path(previous)
    try:
        state = safe_torch_load(previous)
    except CheckpointError as err:
        raise CheckpointError(f"{first}; the previous checkpoint is unusable too: {err}") from None
    epoch = state.get("epoch", "?") if isinstance(state, dict) else "?"
    if warn:
        log.warning("%s failed its integrity check (%s); %s %s (epoch %s)", path, first.reason, action, previous,
                    epoch)
    return state, previous


def keep_previous(path: str | Path, previous: str | Path) -> None:
    """Make `previous` the same file as `path`, atomically: a hard link to `path` under a
    temporary name, renamed over `previous` (a copy where the file system has no hard links).
    `path` is left as it is, so at every instant both names hold a complete file."""
    path, previous = Path(path), Path(previous)
    if previous.exists() and os.path.samefile(path, previous):
        return  # already (a crash came between this and the next write); renaming a link onto it would do nothing
    tmp = previous.with_name(f".{previous.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here: copy, atomically as well
        try:
            data = path.read_bytes()
        except OSError as err:
            raise LongtailError(f"cannot read {path}: {err.strerror or err}") from None
        atomic_write_bytes(previous, data)
        return
    try:
        os.replace(tmp, previous)
    except OSError as err:
        raise _cannot_write(previous, tmp, err) from None
