"""Extending a run with `longtail train --resume --out RUN train.epochs=N` (issue "Usability II",
item 7), and one epoch numbering everywhere (item 10): metrics.jsonl, the console and eval.json
all count the epochs done.

An extended run continues with the schedule computed for the new length, the change written to
config.yaml and RUN/config_history.jsonl, and a finished run is evaluated again at its new end.
With a schedule that does not depend on train.epochs (constant, no warm-up) the extended run is
bitwise the run trained to the new length from scratch.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import yaml

from conftest import REPO
from longtail.cli import main
from longtail.io import safe_torch_load
from longtail.rundir import RunDir


def write_config(tmp_path: Path, **train) -> Path:
    cfg = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 20, "val_per_class": 3},
           "model": {"name": "small_cnn", "params": {"width": 4}},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "progress": False, "num_threads": 1, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_extend_a_finished_run_records_history_and_evaluates_again(tmp_path, capsys):
    cfg = write_config(tmp_path, lr_schedule="cosine", warmup_epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["epoch"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "train.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert (f"extending {run} from 2 to 4 epochs (2 trained); the cosine LR schedule is recomputed for 4 epochs: "
            f"epochs 3-4 follow it") in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch ")] == ["epoch 3/4", "epoch 4/4"]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]  # as the console and eval.json count
    assert json.loads((run / "eval.json").read_text())["epoch"] == 4  # evaluated again at the new end
    assert "last (epoch 4)" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4
    history = RunDir(run).read_config_history()
    assert len(history) == 1 and history[0]["after_epoch"] == 2 and history[0]["changed"] == {"train.epochs": [2, 4]}
    assert main(["train", "--resume", "--out", str(run)]) == 0  # finished at 4: evaluates again, no new history
    assert len(RunDir(run).read_config_history()) == 1 and len(rows(run)) == 4


def test_extended_with_a_constant_schedule_equals_training_the_new_length(tmp_path):
    cfg = write_config(tmp_path, lr_schedule="constant", warmup_epochs=0)
    assert main(["train", str(cfg), "--out", str(tmp_path / "short")]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "short"), "train.epochs=4"]) == 0
    assert main(["train", str(cfg), "train.epochs=4", "--out", str(tmp_path / "long")]) == 0
    a, b = (safe_torch_load(tmp_path / r / "checkpoints/last.pt") for r in ("short", "long"))
    assert a["epoch"] == b["epoch"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])

    def numbers(run):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows(tmp_path / run)]

    assert numbers("short") == numbers("long") and len(numbers("short")) == 4
    ea, eb = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("short", "long"))
    assert ea["per_class"] == eb["per_class"] and ea["best_val"] == eb["best_val"]
    assert (tmp_path / "short/config.yaml").read_text() == (tmp_path / "long/config.yaml").read_text()


def test_shortening_below_the_epochs_done_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path)), "--out", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"longtail: error: cannot set train.epochs=1 on --resume of {run}: it has trained 2 epochs "
                   "already; give 2 or more\n")
    assert (run / "config.yaml").read_text() == before and not (run / "config_history.jsonl").exists()


def test_session_keys_on_resume_hold_for_the_session_only(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "train.eval_batch_size=7", "train.num_threads=2"]) == 0
    assert (f"resuming {run} with train.eval_batch_size=7 (saved: 100), train.num_threads=2 (saved: 1) for this "
            "session only (config.yaml keeps its values)") in capsys.readouterr().out
    assert (run / "config.yaml").read_text() == before and not (run / "config_history.jsonl").exists()
    # a CONFIG given with --resume may differ in the same keys only
    assert main(["train", str(cfg), "train.epochs=3", "--resume", "--out", str(run)]) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]


def test_the_readme_python_example_reaches_a_sensible_top1(tmp_path, monkeypatch, capsys):
    # its config used to train 5 epochs under the default 5-epoch warm-up: 22 % top-1
    code = re.search(r"From Python:\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    logger = logging.getLogger("longtail")
    handlers, level = list(logger.handlers), logger.level
    try:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (the README's own example)
    finally:  # its longtail.log.setup() must not outlive this test
        logger.handlers[:] = handlers
        logger.setLevel(level)
    top1, many, medium, few = map(float, capsys.readouterr().out.splitlines()[-1].split())
    assert top1 > 70 and many > medium > few > 0
    assert json.loads((tmp_path / "runs/digits/eval.json").read_text())["epoch"] == 30
