import os

import pytest
import torch

from longtail.errors import CheckpointError
from longtail.train.checkpoint import atomic_torch_save, atomic_write_text, safe_torch_load


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
