"""One writer per run folder: `RunLock(run_dir)`, an OS-level lock on ``RUN_DIR/.lock``.

Every command that writes into a run folder (`train`, `eval`, the feature cache of
`features` / `dlsa` / `analyze` / `doctor --features`, `similarity`'s default output) holds
the lock while it works there; a second writer fails at once with a one-line error naming
the holder's pid, instead of interleaving metrics, configs and checkpoints.

The lock is `fcntl.flock` on an open file descriptor, so the kernel releases it whenever the
holding process ends, SIGKILL included: a lock file left behind by a killed process is never
stale and never blocks `--resume`. The file holds the holder's ``pid host`` (only for the
error message) and is removed on a normal release. Within one process the lock is
re-entrant (training evaluates the run it just trained). Under torchrun only rank 0 writes,
so only rank 0 takes it. Where `flock` is unavailable (Windows, a file system without
locks) the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from .errors import LongtailError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_HELD: dict[str, list] = {}  # lock file (resolved) -> [fd or None, depth]: this process's locks


class RunFolderInUse(LongtailError):
    """Another process holds the run folder's lock."""


class RunLock:
    """Context manager holding `run_dir`'s lock (module docstring); `acquire()` / `release()`
    do the same by hand. The folder must exist. `hint` ends the error message."""

    def __init__(self, run_dir: str | Path, *, hint: str = "wait for it to finish"):
        self.run_dir = Path(run_dir)
        self.hint = hint
        self._key: str | None = None

    def acquire(self) -> RunLock:
        if self._key is not None:
            return self
        path = self.run_dir / LOCK_NAME
        key = str(path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            _HELD[key] = [_lock(path, self.run_dir, self.hint), 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            if entry[0] is not None:
                _unlock(Path(key), entry[0])

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds `run_dir`'s lock now, without taking it: 'this process', 'pid N' ('pid N on HOST'),
    'pid unknown', or None when no live process holds it (no lock file, a file left by a killed
    process, or locks unsupported). A shared try-lock on the file, released at once: it never
    waits, and two queries never block each other."""
    path = Path(run_dir) / LOCK_NAME
    try:
        key = str(path.resolve())
    except OSError:
        return None
    if key in _HELD:
        return "this process"
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # closing releases the shared lock, if it was taken
    return None


def lock_if_inside(path: str | Path, run_dir: str | Path, *, hint: str = "wait for it to finish"):
    """RunLock(run_dir) when `path` (what a command writes) lies inside that run folder, else a no-op."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and Path(path).resolve().is_relative_to(run_dir.resolve()):
        return RunLock(run_dir, hint=hint)
    return contextlib.nullcontext()


def _lock(path: Path, run_dir: Path, hint: str) -> int | None:
    """An open fd of `path` holding its exclusive flock, or None where locks are unsupported."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LongtailError(f"cannot lock run folder {run_dir}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderInUse(f"run folder {run_dir} is in use by another longtail process ({holder}); "
                                 f"{hint}") from None
        except OSError as err:
            os.close(fd)
            if err.errno in _UNSUPPORTED:
                return None
            raise LongtailError(f"cannot lock run folder {run_dir}: {err.strerror or err}") from None
        if _is_current(fd, path):
            break
        os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for other processes' error messages
    return fd


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file (if it is still ours), then release the lock by closing its fd."""
    if _is_current(fd, path):
        try:
            os.unlink(path)
        except OSError:
            pass
    os.close(fd)


def _is_current(fd: int, path: Path) -> bool:
    """`fd` is the file now at `path` (not one removed, or a folder removed, since it was opened)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _holder(fd: int) -> str:
    """'pid N' (with ' on HOST' when the holder runs elsewhere) from the lock file's content."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()[:2]
        int(pid)
    except (OSError, ValueError, UnicodeDecodeError):
        return "pid unknown"
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"
