import os

import pytest
import torch

from longtail.errors import CheckpointError
from longtail.io import (atomic_torch_save, atomic_write_text, keep_previous, load_with_fallback,
                                       safe_torch_load)


def test_roundtrip(tmp_path):
    atomic_torch_save({"w": torch.arange(5.0), "epoch": 3}, tmp_path / "c.pt")
    out = safe_torch_load(tmp_path / "c.pt")
    assert out["epoch"] == 3 and torch.equal(out["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_truncated_and_corrupt_are_detected(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        safe_torch_load(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the tensor payload
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        safe_torch_load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "missing.pt")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_file_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .* would run code"):
        safe_torch_load(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(Exception, match="No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the tensor payload: the CRC check fails
    path.write_bytes(bytes(data))


def test_keep_previous_then_fall_back_to_it(tmp_path, caplog):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    atomic_torch_save({"w": torch.randn(1000), "epoch": 1}, last)
    keep_previous(last, prev)
    keep_previous(last, prev)  # again, as after a crash between keeping and writing: prev.pt is last.pt already
    atomic_torch_save({"w": torch.randn(1000), "epoch": 2}, last)
    assert safe_torch_load(prev)["epoch"] == 1 and safe_torch_load(last)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]  # no temporary left behind
    caplog.set_level("INFO", logger="longtail")
    state, used = load_with_fallback(last, prev, action="resuming from")
    assert (state["epoch"], used, caplog.messages) == (2, last, [])
    _flip_byte(last)
    state, used = load_with_fallback(last, prev, action="resuming from")
    assert (state["epoch"], used) == (1, prev)
    lines = caplog.messages
    assert len(lines) == 1 and lines[0].startswith(f"{last} failed its integrity check (CRC mismatch in ")
    assert lines[0].endswith(f"); resuming from {prev} (epoch 1)") and caplog.records[0].levelname == "WARNING"
    assert load_with_fallback(last, prev, action="resuming from", warn=False)[1] == prev  # warn=False: silent
    with pytest.raises(CheckpointError, match="CRC mismatch"):  # no previous checkpoint: the error
        load_with_fallback(last, tmp_path / "none.pt", action="resuming from")
    _flip_byte(prev)
    with pytest.raises(CheckpointError, match="the previous checkpoint is unusable too"):
        load_with_fallback(last, prev, action="resuming from")
    torch.save({"payload": _RunsCode()}, last)  # refused as unsafe: never replaced by the previous one
    atomic_torch_save({"epoch": 1}, prev)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_with_fallback(last, prev, action="resuming from")
    assert len(caplog.messages) == 1


def test_keep_previous_copies_without_hard_links(tmp_path, monkeypatch):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    atomic_torch_save({"epoch": 3}, last)

    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    keep_previous(last, prev)
    assert prev.read_bytes() == last.read_bytes() and os.stat(prev).st_ino != os.stat(last).st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_json_writer_is_strict_and_names_the_non_finite_key(tmp_path):
    """No NaN / infinity ever reaches a run's JSON files: refused with the key named, old file kept."""
    import json
    import math
    import re

    from longtail.errors import LongtailError
    from longtail.io import atomic_write_json

    path = tmp_path / "eval.json"
    atomic_write_json(path, {"top1": 50.0, "per_class": [None, 1.0]})
    before = path.read_text()
    assert json.loads(before, parse_constant=pytest.fail) == {"top1": 50.0, "per_class": [None, 1.0]}
    for value, where in ((math.nan, "best_val.per_class[1]"), (math.inf, "best_val.per_class[1]")):
        message = rf"^cannot write {re.escape(str(path))}: {re.escape(where)} is not a finite number"
        with pytest.raises(LongtailError, match=message):
            atomic_write_json(path, {"top1": 1.0, "best_val": {"per_class": [2.0, value]}})
        assert path.read_text() == before and os.listdir(tmp_path) == ["eval.json"]



@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    """As a plain open() would create the file (tempfile.mkstemp's 0o600 hid every run file)."""
    import stat

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        atomic_torch_save({"epoch": 1}, tmp_path / "sub" / "last.pt")
        atomic_write_text(tmp_path / "new.txt", "replaced")
    finally:
        os.umask(old)
    for path in (tmp_path / "new.txt", tmp_path / "sub" / "last.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o777 & ~umask


def test_atomic_write_where_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    import errno

    from longtail.errors import LongtailError
    from longtail import io as checkpoint

    (tmp_path / "afile.txt").write_text("x")
    target = tmp_path / "afile.txt" / "run" / "eval.json"
    with pytest.raises(LongtailError, match=rf"^cannot write {target}: Not a directory$"):
        atomic_write_text(target, "{}")
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(checkpoint.os, "open", denied)
    with pytest.raises(LongtailError, match=rf"^cannot write {tmp_path / 'ro' / 'a.txt'}: Permission denied$"):
        atomic_write_text(tmp_path / "ro" / "a.txt", "new")
    assert not any((tmp_path / "ro").iterdir()) and (tmp_path / "afile.txt").read_text() == "x"
