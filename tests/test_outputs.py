"""Output locations: every command's --out that cannot be written is a one-line error (exit 2)
before any work, nothing is created; every file a command writes honours the umask."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from longtail import outputs
from longtail.cli import build_parser, main

DIGITS = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 10, "val_per_class": 2},
          "model": {"name": "small_cnn", "params": {"width": 4}},
          "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "milestones": [], "progress": False}}

# Every command with an output location: (id, argv with OUT for the location, "folder" or "file").
# The inputs need not exist: the output is checked before anything else is read.
COMMANDS = [
    ("train", ["train", "cfg.yaml", "--out", "OUT"], "folder"),
    ("train --resume", ["train", "--resume", "--out", "OUT"], "folder"),
    ("predict", ["predict", "run", "img.png", "--out", "OUT"], "file"),
    ("export", ["export", "run", "--out", "OUT"], "file"),
    ("report", ["report", "run", "--out", "OUT"], "file"),
    ("doctor", ["doctor", "data", "--out", "OUT"], "folder"),
    ("demo", ["demo", "--out", "OUT"], "folder"),
    ("bench", ["bench", "GRID", "--out", "OUT"], "folder"),
    ("analyze", ["analyze", "run", "--out", "OUT"], "folder"),
    ("dlsa", ["dlsa", "run", "--out", "OUT"], "folder"),
    ("similarity", ["similarity", "run", "--out", "OUT"], "folder"),
    ("study toy", ["study", "toy", "--data", "digits", "--out", "OUT"], "folder"),
    ("study mixup-similarity", ["study", "mixup-similarity", "--data", "digits", "--out", "OUT"], "folder"),
    ("study gaussian", ["study", "gaussian", "--out", "OUT"], "folder"),
]


def _commands_with_out(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands_with_out(sub, f"{prefix}{name} ")
        elif "--out" in action.option_strings:
            found.add(prefix.strip())
    return found


def test_every_command_with_an_out_option_is_tested_here():
    assert _commands_with_out(build_parser()) == {c[0] for c in COMMANDS if c[0] != "train --resume"}


def _argv(template: list[str], out: Path, grid: Path) -> list[str]:
    return [str(out) if a == "OUT" else str(grid) if a == "GRID" else a for a in template]


@pytest.fixture
def grid(tmp_path) -> Path:
    """A valid grid (bench reads its grid before its --out is known)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(DIGITS))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "out": str(tmp_path / "grid_out"),
                                    "imbalance_ratios": [10], "seeds": [0], "methods": [{"name": "ce"}]}))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.removeprefix("longtail: error: ").rstrip("\n")


@pytest.mark.parametrize("template, kind", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_out_under_a_regular_file_is_one_line_before_any_work(tmp_path, grid, capsys, template, kind):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    out = afile / ("run" if kind == "folder" else "out.file")
    before = _listing(tmp_path)
    assert main(_argv(template, out, grid)) == 2
    assert _one_line(capsys) == f"cannot write to --out {out}: {afile} is not a folder"
    assert _listing(tmp_path) == before and afile.read_text() == "not a folder"


@pytest.mark.parametrize("template, kind", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_out_in_a_folder_without_write_permission_is_one_line(tmp_path, grid, capsys, monkeypatch, template, kind):
    """Simulated (os.access says no for the folder), so it holds for root too; the real case follows."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode, **k))
    out = locked / "sub" / ("run" if kind == "folder" else "out.file")
    assert main(_argv(template, out, grid)) == 2
    assert _one_line(capsys) == f"cannot write to --out {out}: Permission denied ({locked} is not writable)"
    assert not any(locked.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o555) folder; the simulated test "
                                                "above covers the message for every command")
@pytest.mark.parametrize("template, kind", [c[1:] for c in COMMANDS if c[0] in ("train", "report", "doctor")],
                         ids=["train", "report", "doctor"])
def test_out_in_a_read_only_folder_is_one_line(tmp_path, grid, capsys, template, kind):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / ("run" if kind == "folder" else "out.file")
        assert main(_argv(template, out, grid)) == 2
        assert "Permission denied" in _one_line(capsys)
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_out_that_is_a_file_where_a_folder_is_needed(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert main(["train", "cfg.yaml", "--out", str(afile)]) == 2
    assert _one_line(capsys) == f"cannot write to --out {afile}: it is a file; give a folder"
    assert main(["export", "run", "--out", str(tmp_path)]) == 2
    assert _one_line(capsys) == f"cannot write to --out {tmp_path}: it is a folder; give a file name"


def test_grid_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(DIGITS))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "out": str(tmp_path / "afile.txt/g"),
                                    "imbalance_ratios": [10], "seeds": [0], "methods": [{"name": "ce"}]}))
    assert main(["bench", str(path), "--no-progress"]) == 2
    assert _one_line(capsys) == (f"cannot write to the out of grid {path} {tmp_path / 'afile.txt/g'}: "
                                 f"{tmp_path / 'afile.txt'} is not a folder")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    (root / "cfg.yaml").write_text(yaml.safe_dump(DIGITS))
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


def test_eval_into_a_run_folder_without_write_permission(digits_run, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode, **k: False if Path(p) == run else real_access(p, mode, **k))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["eval", str(run)]) == 2
    assert _one_line(capsys) == f"cannot write to run folder {run}: Permission denied ({run} is not writable)"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def test_every_written_file_honours_the_umask(tmp_path, umask, capsys):
    """As a plain open() would: 0o666 & ~umask for files (0o644 with umask 022: colleagues can
    read a run), 0o777 & ~umask for folders; train, eval, report, export, predict, doctor."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(DIGITS))
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        run = out / "run"
        assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(run)]) == 0
        assert main(["eval", str(run)]) == 0
        assert main(["report", str(run), "--out", str(out / "report.html")]) == 0
        assert main(["export", str(run), "--out", str(out / "model.pt2")]) == 0
        assert main(["predict", str(run), str(image), "--out", str(out / "pred.csv"), "--no-progress"]) == 0
        assert main(["doctor", str(tmp_path / "cfg.yaml"), "--out", str(out / "doctor"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    modes = _modes(out)
    names = set(modes)
    for expected in ("run/config.yaml", "run/data.json", "run/metrics.jsonl", "run/checkpoints/last.pt",
                     "run/eval.json", "run/predictions.npz", "report.html", "model.pt2", "pred.csv",
                     "doctor/doctor.json", "doctor/class_counts.png"):
        assert expected in names, sorted(names)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != ((0o777 if (out / name).is_dir() else 0o666) & ~umask)}
    assert not wrong, (oct(umask), wrong)
