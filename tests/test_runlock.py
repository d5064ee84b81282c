"""RunLock: one writer per run folder (the end-to-end cases are in test_reliability.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

from longtail.errors import LongtailError
from longtail.runlock import LOCK_NAME, RunFolderInUse, RunLock, lock_holder, lock_if_inside


def test_lock_is_reentrant_in_a_process_and_removed_on_release(tmp_path):
    with RunLock(tmp_path) as outer:
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with RunLock(tmp_path):  # e.g. training evaluates the run it trained
            pass
        assert (tmp_path / LOCK_NAME).is_file()  # still held by `outer`
        outer.acquire()  # idempotent
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another open file: as another process
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"777 elsewhere\n")
    try:
        with pytest.raises(RunFolderInUse, match=rf"run folder {tmp_path} is in use by another longtail process "
                                                 r"\(pid 777 on elsewhere\); choose another"):
            RunLock(tmp_path, hint="choose another").acquire()
    finally:
        os.close(fd)
    with RunLock(tmp_path):  # released: free again
        pass


def test_a_lock_file_removed_by_its_holder_is_not_locked_twice(tmp_path):
    """A waiter that opened the old file before the holder removed it locks the new file instead."""
    first = RunLock(tmp_path).acquire()
    old = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    first.release()  # unlinks the file, then unlocks
    fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old inode is free but no longer the lock file
    try:
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_NAME).is_file()
    finally:
        os.close(old)


def test_missing_folder_and_lock_if_inside(tmp_path):
    with pytest.raises(LongtailError, match="cannot lock run folder .*missing"):
        RunLock(tmp_path / "missing").acquire()
    assert isinstance(lock_if_inside(tmp_path / "similarity" / "x.json", tmp_path), RunLock)
    assert isinstance(lock_if_inside(tmp_path.parent / "elsewhere", tmp_path), contextlib.nullcontext)
    assert isinstance(lock_if_inside(tmp_path / "missing" / "a", tmp_path / "missing"), contextlib.nullcontext)


def test_lock_holder_asks_without_taking_the_lock(tmp_path):
    assert lock_holder(tmp_path) is None and lock_holder(tmp_path / "missing") is None
    (tmp_path / LOCK_NAME).write_text("999 gone\n")  # left by a killed process: not held
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):
        assert lock_holder(tmp_path) == "this process"
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another open file: as another process
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"777 elsewhere\n")
    try:
        assert lock_holder(tmp_path) == "pid 777 on elsewhere"
        assert lock_holder(tmp_path) == "pid 777 on elsewhere"  # asking took nothing
    finally:
        os.close(fd)
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):  # the queries left the lock free
        pass
