"""Output locations, checked before any work is done.

`check_output` tells whether a file or folder can be written where a command was asked to
write it (`--out` of train, predict, export, report, doctor, bench, ...), without creating
anything: a path under a regular file, or in a folder this process may not write, is a
one-line LongtailError naming the path and the reason, before data is read or a model is
trained. The CLI runs it for every command's outputs (cli.py); the writes themselves stay
atomic (io.py), so a failure later still leaves no half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LongtailError


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists ('.' ends every relative path)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _read_only_file_system(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows) or not readable
        return False


def check_output(path: str | Path, *, folder: bool, name: str = "--out") -> Path:
    """Return `path` if it can be written, else raise LongtailError naming it and the reason.

    `folder=True`: `path` is a folder that exists or can be created (its nearest existing
    ancestor is a writable folder); `folder=False`: a file whose folder exists or can be
    created. An existing file is fine (it is replaced atomically). `name` says where the path
    came from in the message, e.g. "cannot write to --out a.txt/run: a.txt is not a folder".
    Nothing is created; permissions are those of os.access (a process running as root may
    write into read-only folders).
    """
    path = Path(path)

    def refuse(reason: str) -> None:
        raise LongtailError(f"cannot write to {name} {path}: {reason}")

    if not folder and path.is_dir():
        refuse("it is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        refuse("it is a file; give a folder")
    where = _nearest_existing(path if folder else path.parent)
    if not where.is_dir():
        refuse(f"{where} is not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        reason = "Read-only file system" if _read_only_file_system(where) else "Permission denied"
        refuse(f"{reason} ({where} is not writable)")
    return path
