"""Library code logs through the `logging` module (longtail/log.py), never through `log=` callables.

(a) a source scan: no function of src/longtail takes a `log` or `report` parameter;
(b) a run's lines (data summary, epochs, resuming) are INFO records of the "longtail" loggers,
    shown on stdout by the command line and not at all from Python without setup();
(c) warnings_only() hides a block's INFO lines (the demo's and the studies' inner runs), and
    `longtail demo` shows its comparison without the runs' epoch lines;
(d) a checkpoint fallback (last.pt corrupt, prev.pt used) is one WARNING: "longtail: warning: ..."
    on stderr once set up.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import longtail
from conftest import REPO, tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.log import setup, warnings_only
from longtail.runs import train_run


def test_no_library_function_takes_a_log_callable():
    found = []
    for path in sorted((REPO / "src" / "longtail").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
                found += [f"{path.relative_to(REPO)}:{node.lineno} {node.name}({name}=...)"
                          for name in sorted(names & {"log", "report"})]
    assert found == []


def test_a_run_logs_info_records_and_prints_nothing_without_setup(tmp_path, caplog, capsys, monkeypatch):
    root = logging.getLogger("longtail")  # as in a fresh interpreter: no setup() yet (a CLI test may have run)
    monkeypatch.setattr(root, "handlers", [])
    cfg = config_from_dict(tiny_config(**{"train.epochs": 2}))
    with caplog.at_level(logging.NOTSET, logger="longtail"):  # the level, restored afterwards
        train_run(cfg, tmp_path / "quiet", arrays=tiny_arrays(), evaluate=False)
    assert capsys.readouterr().out == ""
    with caplog.at_level("INFO", logger="longtail"):
        train_run(cfg, tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    epochs = [r for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [r.getMessage().split(":")[0] for r in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert {r.name for r in epochs} == {"longtail.engine.loop"} and {r.levelname for r in epochs} == {"INFO"}


def test_warnings_only_hides_info_lines_of_a_block(caplog):
    logger = logging.getLogger("longtail.some.module")
    with caplog.at_level("INFO", logger="longtail"):
        with warnings_only():
            logger.info("hidden")
            logger.warning("shown")
        logger.info("after")
        assert logging.getLogger("longtail").level == logging.INFO  # restored
    assert caplog.messages == ["shown", "after"]


def test_demo_prints_its_comparison_but_not_the_runs_epochs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"== ce: training {tmp_path / 'demo' / 'ce'}" in out and "long-tailed digits: " in out
    assert "run folders: " in out and "epoch 1/1:" not in out
    assert Path(tmp_path / "demo" / "class_balanced" / "eval.json").is_file()
    report = tmp_path / "demo" / "report.html"  # the HTML report of both runs, its path printed last
    assert report.is_file() and "class_balanced" in report.read_text()
    assert out.rstrip().splitlines()[-1].startswith(f"report: {report} ")


def test_a_checkpoint_fallback_is_one_warning_on_stderr(tmp_path, capsys):
    """longtail.load (predict, export) and evaluation: with setup(), as the command line shows it."""
    run = tmp_path / "run"
    train_run(config_from_dict(tiny_config(**{"train.epochs": 2})), run, arrays=tiny_arrays(), evaluate=False)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated: longtail.load falls back to prev.pt
    setup()
    capsys.readouterr()
    assert longtail.load(run, device="cpu").epoch == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "failed its integrity check" in line]
    assert len(lines) == 1 and lines[0].startswith(f"longtail: warning: {last} failed its integrity check")
    assert lines[0].endswith(f"{run / 'checkpoints' / 'prev.pt'} (epoch 1)")
    assert "failed its integrity check" not in captured.out
