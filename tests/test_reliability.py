"""Crash safety with real processes and real kills, simulated disk-full, bad inputs end to end."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from longtail.cli import main
from longtail.config import RunConfig, apply_overrides, config_from_dict
from longtail.errors import ConfigError
from longtail import io as ckpt_mod
from longtail.io import safe_torch_load

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_config(path: Path, epochs: int = 5) -> Path:
    cfg = {"data": {"source": "digits", "imbalance_ratio": 2, "max_count": 100, "test_per_class": 20,
                    "val_per_class": 5},
           "model": {"name": "small_cnn", "params": {"width": 8}},
           "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1, "milestones": [3],
                     "progress": False, "num_threads": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def longtail(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtail", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, trained in a subprocess like the interrupted ones."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "cfg.yaml")
    proc = longtail("train", str(cfg), "--out", str(root / "run"))
    assert proc.returncode == 0, proc.stderr
    return cfg, root / "run"


def assert_same_run(a: Path, b: Path) -> None:
    ma = safe_torch_load(a / "checkpoints/last.pt")["model"]
    mb = safe_torch_load(b / "checkpoints/last.pt")["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
    for key in ("top1", "per_class", "confusion", "mcc", "ece"):
        assert ea[key] == eb[key], key
    assert ea["best_val"]["epoch"] == eb["best_val"]["epoch"] and ea["best_val"]["top1"] == eb["best_val"]["top1"]
    la = [json.loads(r)["train_loss"] for r in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(r)["train_loss"] for r in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


# `longtail train` that SIGKILLs itself right after optimizer step STEP of epoch EPOCH (both 1-based):
# a kill during an epoch at a point fixed by the run itself, not by how fast the machine is.
KILL_DURING_EPOCH = """
import os, signal, sys
import torch
from longtail.engine import loop
EPOCH, STEP = int(sys.argv[1]), int(sys.argv[2])
where = {"epoch": 0, "step": 0}
real_train_epoch, real_step = loop.Trainer.train_epoch, torch.optim.SGD.step
def train_epoch(self, epoch, bar):
    where.update(epoch=epoch + 1, step=0)
    return real_train_epoch(self, epoch, bar)
def step(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    where["step"] += 1
    if (where["epoch"], where["step"]) == (EPOCH, STEP):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
loop.Trainer.train_epoch, torch.optim.SGD.step = train_epoch, step
from longtail.cli import main
sys.exit(main(sys.argv[3:]))
"""


def kill_during_epoch(cfg: Path, run: Path, *, epoch: int, step: int) -> None:
    """`longtail train CFG --out RUN`, SIGKILLed by itself after `step` optimizer steps of `epoch`."""
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_EPOCH, str(epoch), str(step), "train", str(cfg),
                           "--out", str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_kill_9_during_an_epoch_then_resume(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    kill_during_epoch(cfg, run, epoch=2, step=3)  # after the epoch-1 checkpoint, inside epoch 2
    assert safe_torch_load(run / "checkpoints/last.pt")["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / ".lock").is_file()  # the killed process's lock file: no obstacle to --resume
    resumed = longtail("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch 1/5" in resumed.stdout
    assert_same_run(ref, run)


def _corrupt(path: Path) -> None:
    """Flip one byte inside the tensor payload: the zip is intact, a record's CRC-32 is not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_last_checkpoint_of_a_killed_run_resumes_from_prev(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    kill_during_epoch(cfg, run, epoch=3, step=2)
    assert safe_torch_load(run / "checkpoints/last.pt")["epoch"] == 2
    assert safe_torch_load(run / "checkpoints/prev.pt")["epoch"] == 1
    _corrupt(run / "checkpoints/last.pt")
    resumed = longtail("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    last, prev = run / "checkpoints/last.pt", run / "checkpoints/prev.pt"
    assert f"longtail: warning: {last} failed its integrity check (CRC mismatch in " in resumed.stderr
    assert f"; resuming from {prev} (epoch 1)\n" in resumed.stderr
    assert f"resuming {run} after epoch 1/5" in resumed.stdout
    assert_same_run(ref, run)  # metrics.jsonl: the line of epoch 2 was dropped and written again
    assert safe_torch_load(prev)["epoch"] == 4


def test_corrupt_last_checkpoint_of_a_finished_run(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    _corrupt(run / "checkpoints/last.pt")
    evaluated = longtail("eval", str(run))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"; evaluating {run / 'checkpoints/prev.pt'} (epoch 4)" in evaluated.stderr  # a warning
    assert json.loads((run / "eval.json").read_text())["epoch"] == 4
    resumed = longtail("train", "--resume", "--out", str(run))  # trains epoch 5 again
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run / 'checkpoints/prev.pt'} (epoch 4)" in resumed.stderr
    assert_same_run(ref, run)


# `longtail train` that SIGKILLs itself when the NTH rename onto checkpoints/NAME is about to happen
KILL_WHILE_SAVING = """
import os, signal, sys
from longtail import io as checkpoint
NAME, NTH = sys.argv[1], int(sys.argv[2])
real_replace = os.replace
calls = {"n": 0}
def replace(src, dst):
    if str(dst).endswith(NAME):
        calls["n"] += 1
        if calls["n"] == NTH:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
checkpoint.os.replace = replace
from longtail.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("name, nth", [
    ("last.pt", 2),  # the epoch-2 checkpoint is fully written to its temporary file, not renamed
    ("prev.pt", 1),  # epoch 2: the hard link to the epoch-1 checkpoint is made, not yet renamed to prev.pt
])
def test_kill_9_while_a_checkpoint_is_written_then_resume(reference, tmp_path, name, nth):
    cfg, ref = reference
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, name, str(nth), "train", str(cfg),
                           "--out", str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(f".{name}.*.tmp"))  # the interrupted write
    assert safe_torch_load(run / "checkpoints/last.pt")["epoch"] == 1  # the previous checkpoint is intact
    resumed = longtail("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert_same_run(ref, run)


class _FullDisk(io.RawIOBase):
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_after(monkeypatch, successful_writes: int):
    real_fdopen = os.fdopen
    count = {"n": 0}

    def fdopen(fd, *a, **k):
        count["n"] += 1
        if count["n"] > successful_writes:
            os.close(fd)
            return _FullDisk()
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(ckpt_mod.os, "fdopen", fdopen)


def test_disk_full_before_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys):
    _disk_full_after(monkeypatch, 0)
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", epochs=2)), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert not run.exists()


def test_disk_full_mid_run_keeps_a_resumable_run(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", epochs=2)
    _disk_full_after(monkeypatch, 4)  # config.yaml, data.json, best_val.pt, last.pt of epoch 1
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert safe_torch_load(run / "checkpoints/last.pt")["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert safe_torch_load(run / "checkpoints/last.pt")["epoch"] == 2


# ------------------------------------------------------------------ one writer per run folder


def _hold_lock(run: Path, pid: int) -> int:
    """Take RUN/.lock as another process would (its own open file), recording `pid` as the holder."""
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid} {socket.gethostname()}\n".encode())
    return fd


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_second_writer_of_a_run_folder_is_refused(reference, tmp_path, capsys):
    cfg, ref = reference
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    shutil.copytree(ref, run)
    fresh.mkdir()  # a new run whose first writer has just created its folder and taken the lock
    fds = [_hold_lock(run, 4242), _hold_lock(fresh, 4343)]
    try:
        before = _snapshot(run), _snapshot(fresh)
        in_use = "is in use by another longtail process"
        for argv, message in [
            (["train", str(cfg), "--out", str(fresh)],
             f"run folder {fresh} {in_use} (pid 4343); wait for it to finish or choose another --out"),
            (["train", "--resume", "--out", str(run)], f"run folder {run} {in_use} (pid 4242); wait for it to finish"),
            (["eval", str(run)], f"run folder {run} {in_use} (pid 4242); wait for it to finish"),
            (["features", str(run)], f"run folder {run} {in_use} (pid 4242)"),
            (["similarity", str(run)], f"run folder {run} {in_use} (pid 4242)"),
        ]:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(f"longtail: error: {message}") and err.count("\n") == 1, err
        assert (_snapshot(run), _snapshot(fresh)) == before  # nothing written, nothing removed
    finally:
        for fd in fds:
            os.close(fd)


HOLD_LOCK = ("import sys; from longtail.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); sys.stdin.read()")


def test_lock_of_a_killed_writer_does_not_block_the_next(reference, tmp_path, capsys):
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # it holds the lock now
        assert main(["eval", str(run)]) == 2
        assert f"is in use by another longtail process (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").read_text().split()[0] == str(holder.pid)  # left behind by the SIGKILL
    assert main(["train", "--resume", "--out", str(run)]) == 0  # the kernel released its lock
    assert not (run / ".lock").exists()
    assert json.loads((run / "eval.json").read_text())["epoch"] == 5


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    for split, n in (("train", 12), ("test", 3)):
        for c in range(3):
            d = tmp_path / "ds" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.jpg").write_bytes(_jpeg((80 * c, 0, 0)))
    return tmp_path / "ds"


def _train_folder(tmp_path, folder, *extra):
    cfg = write_config(tmp_path / "c.yaml", epochs=1)
    return main(["train", str(cfg), "data.source=imagefolder", f"data.root={folder}", "data.imbalance_ratio=2",
                 "data.val_per_class=0", "data.max_count=null", f"data.cache_dir={tmp_path / 'cache'}", *extra,
                 "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "train/c1/3.jpg").write_bytes(b""), "image file is empty (0 bytes): train/c1/3.jpg"),
    (lambda f: (f / "train/c1/3.jpg").write_bytes(b"\xff\xd8garbage"), "cannot decode image train/c1/3.jpg"),
    (lambda f: (f / "train/c2/0.jpg").write_bytes(_jpeg((1, 2, 3))[:40]), "cannot decode image train/c2/0.jpg"),
    (lambda f: os.symlink("/nonexistent/x.jpg", f / "train/c0/link.jpg"), "cannot read image train/c0/link.jpg"),
    (lambda f: (f / "train/c3").mkdir(), "class 'c3' has no images"),
    (lambda f: Image.new("RGB", (9, 8)).save(f / "train/c0/big.png"), "set data.image_size"),
])
def test_bad_image_inputs_one_line(tmp_path, folder, capsys, damage, message):
    damage(folder)
    assert _train_folder(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unexpected_mode_is_converted(tmp_path, folder):
    Image.new("L", (8, 8), 7).save(folder / "train/c0/gray.png")
    Image.new("RGBA", (8, 8)).save(folder / "train/c0/alpha.png")
    assert _train_folder(tmp_path, folder) == 0


@pytest.mark.parametrize("override, message", [
    ("data.imbalance_ratio=abc", "'data.imbalance_ratio' must be float, got str"),
    ("data.imbalance_ratio=.nan", "'data.imbalance_ratio' must be a number >= 1"),
    ("data.imbalance_ratio=1000", "is left with zero training images after subsampling"),
    ("loss.name=focal_los", "unknown loss 'focal_los'"),
    ("train.lr=1e30", "non-finite loss"),
])
def test_bad_run_inputs_one_line(tmp_path, capsys, override, message):
    cfg = write_config(tmp_path / "c.yaml", epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(cfg), override, "train.warmup_epochs=0", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not run.exists()


def test_label_out_of_range_in_split_list(tmp_path, folder, capsys):
    (tmp_path / "train.txt").write_text("train/c0/0.jpg 0\ntrain/c1/0.jpg -1\n")
    cfg = write_config(tmp_path / "c.yaml", epochs=1)
    code = main(["train", str(cfg), "data.source=split_list", f"data.root={folder}", f"data.train_list={tmp_path}/train.txt",
                 "data.profile=none", "--out", str(tmp_path / "run")])
    assert code == 2 and "train.txt:2: label -1 out of range" in capsys.readouterr().err


# ------------------------------------------------------------------ property-based config test

KEYS = sorted({f for section in RunConfig().to_dict().values() if isinstance(section, dict) for f in section}
              | set(RunConfig().to_dict()) | {"augment", "crop_padding", "flip", "bogus", ""})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["ce", "instance", "standard", "exp", "cifar10", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)
sections = st.dictionaries(st.sampled_from(list(RunConfig().to_dict()) + ["bogus"]),
                           st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5)), max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(sections, values))
def test_any_config_validates_or_raises_config_error(candidate):
    try:
        cfg = config_from_dict(candidate)
    except ConfigError:
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_override_applies_or_raises_config_error(overrides):
    try:
        config_from_dict(apply_overrides({}, overrides))
    except ConfigError:
        pass


def test_unreadable_dataset_path(tmp_path, folder, monkeypatch, capsys):
    # running as root, chmod cannot make a folder unreadable: simulate the permission check
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    assert _train_folder(tmp_path, folder) == 2
    assert f"dataset path is not readable: {folder}" in capsys.readouterr().err
