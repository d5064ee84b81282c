"""RunDir: the one class that knows a run folder's files.

(a) its reads and writes: config round trip, metrics log (torn last line dropped, truncation
    for a branch), checkpoints (prev.pt kept, a corrupt last.pt falls back to it with one
    line), results, and the one-line messages of a folder that is missing, not a run, or
    untrained;
(b) a source scan: no module of src/longtail but rundir.py spells a run folder's file names
    in code (docstrings and comments may: they describe the layout to users).
"""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from longtail.config import RunConfig, config_from_dict, diff_configs, dump_config
from longtail.errors import CheckpointError, ConfigError
from longtail.rundir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src" / "longtail"


def _one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


def test_config_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.train.epochs, cfg.loss.name = 7, "focal"
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    assert run.is_run() and run.has(RunDir.CONFIG)
    back = run.read_config()
    assert diff_configs(cfg, back) == [] and dump_config(back) == dump_config(cfg)
    assert run.read_config_mapping()["train"]["epochs"] == 7
    (run.path / RunDir.CONFIG).write_text("train: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml in .* cannot be read") as info:
        run.read_config_mapping()
    _one_line(info)


def test_metrics_append_and_a_torn_last_line_is_dropped(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    for epoch in range(1, 4):
        run.append_metrics({"epoch": epoch, "loss": 1.0 / epoch})
    with open(run.path / RunDir.METRICS, "a") as fh:
        fh.write('{"epoch": 4, "lo')  # a crash in the middle of a write
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]


def test_keep_metrics_before(tmp_path):
    source = RunDir(tmp_path / "source")
    source.path.mkdir()
    for epoch in range(1, 5):
        source.append_metrics({"epoch": epoch})
    branch = RunDir(tmp_path / "branch")
    branch.path.mkdir()
    branch.keep_metrics_before(2, source=source)  # the rows of the first 2 epochs
    assert [r["epoch"] for r in branch.read_metrics()] == [1, 2]
    source.keep_metrics_before(3)  # its own rows
    assert [r["epoch"] for r in source.read_metrics()] == [1, 2, 3]


def test_sessions_give_each_epoch_its_machine(tmp_path):
    """A session trains from its start epoch up to the next session's start; a session resumed from
    prev.pt (an epoch before the previous one's start) replaces that one's epochs."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.epoch_machines() == {}
    for epoch in range(1, 6):
        run.append_metrics({"epoch": epoch})
    for start, label in ((0, "A"), (3, "B"), (2, "C")):
        run.append_session({"start_epoch": start, "machine": {"label": label}})
    assert run.epoch_machines() == {1: "A", 2: "A", 3: "C", 4: "C", 5: "C"}
    branch = RunDir(tmp_path / "branch")
    branch.path.mkdir()
    branch.keep_sessions_before(3, source=run)  # the sessions that trained its first 3 epochs
    assert [s["machine"]["label"] for s in branch.read_sessions()] == ["A", "C"]


def test_metrics_written_0_based_before_are_read_1_based_and_rewritten_so(tmp_path):
    # files of earlier versions (and the shipped benchmarks/artifacts) count epochs from 0
    old = RunDir(tmp_path / "old")
    old.path.mkdir()
    (old.path / RunDir.METRICS).write_text("".join(json.dumps({"epoch": e, "lr": 0.1}) + "\n" for e in range(3)))
    assert [r["epoch"] for r in old.read_metrics()] == [1, 2, 3]
    branch = RunDir(tmp_path / "branch")
    branch.path.mkdir()
    branch.keep_metrics_before(2, source=old)  # a branch (or a resume) of an old run: the first 2 epochs
    assert [json.loads(r)["epoch"] for r in (branch.path / RunDir.METRICS).read_text().splitlines()] == [1, 2]
    branch.append_metrics({"epoch": 3, "lr": 0.1})
    assert [r["epoch"] for r in branch.read_metrics()] == [1, 2, 3]
    shipped = REPO / "benchmarks" / "artifacts" / "cifar10_lt_ce"
    assert RunDir(shipped).read_metrics()[0]["epoch"] == 1


def test_config_history_and_overrides_on_the_saved_config(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_config_history() == []
    run.write_config(config_from_dict({"train": {"epochs": 2}}))
    assert run.read_config(["train.epochs=5"]).train.epochs == 5 and run.read_config().train.epochs == 2
    run.append_config_history({"after_epoch": 2, "changed": {"train.epochs": [2, 5]}})
    assert run.read_config_history() == [{"after_epoch": 2, "changed": {"train.epochs": [2, 5]}}]


def test_save_checkpoint_keeps_prev(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 1})
    assert run.last.is_file() and not run.prev.exists()
    run.save_checkpoint({"epoch": 2})
    assert run.load_checkpoint()[0]["epoch"] == 2
    assert run.checkpoint_epoch("last") == 2
    with caplog.at_level("INFO", logger="longtail"):
        state, path = RunDir(tmp_path).load_checkpoint()
    assert path == run.last and state["epoch"] == 2 and caplog.messages == []
    import torch

    assert torch.load(run.prev, weights_only=True)["epoch"] == 1


def test_a_corrupt_last_checkpoint_falls_back_to_prev_with_one_line(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 1})
    run.save_checkpoint({"epoch": 2})
    data = run.last.read_bytes()
    run.last.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level("INFO", logger="longtail"):
        assert run.checkpoint_epoch("last") == 1  # the epoch it would load, without a warning
        assert caplog.messages == []
        state, path = run.load_checkpoint(action="using")
    assert state["epoch"] == 1 and path == run.prev
    lines = caplog.messages
    assert len(lines) == 1 and "\n" not in lines[0] and caplog.records[0].levelname == "WARNING"
    assert lines[0].startswith(f"{run.last} failed its integrity check") and f"using {run.prev} (epoch 1)" in lines[0]
    run.prev.write_bytes(b"")  # both gone: one error naming both
    with pytest.raises(CheckpointError, match="the previous checkpoint is unusable too") as info:
        run.load_checkpoint()
    _one_line(info)


def test_require_names_the_problem(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as info:
        RunDir(missing).require()
    assert _one_line(info) == f"run folder not found: {missing}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        RunDir(empty).require()
    assert _one_line(info) == f"not a run folder (no config.yaml): {empty}"
    run = RunDir(tmp_path / "run")
    run.write_config(RunConfig())
    assert run.require() is run
    with pytest.raises(CheckpointError) as info:
        run.require(trained=True)
    assert _one_line(info) == f"no checkpoint in {run.path} (train it first)"
    with pytest.raises(CheckpointError, match=r"no best_val checkpoint in .* \(the run had no validation split\)"):
        run.require_checkpoint("best_val")
    with pytest.raises(ConfigError, match="checkpoint must be one of last, best_val, got 'first'"):
        run.require_checkpoint("first")
    run.save_checkpoint({"epoch": 1})
    assert run.require(trained=True) is run and run.require_checkpoint() == run.last


def test_results_and_json_files(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        run.read_eval()
    assert _one_line(info) == f"no eval.json in {tmp_path}: run `longtail eval {tmp_path}` first"
    with pytest.raises(CheckpointError, match="no predictions.npz in"):
        run.read_predictions()
    buffer = io.BytesIO()
    np.savez(buffer, logits=np.eye(3, dtype=np.float32), labels=np.arange(3))
    run.write_bytes(RunDir.PREDICTIONS, buffer.getvalue())
    preds = run.read_predictions()
    assert preds["logits"].shape == (3, 3) and preds["labels"].tolist() == [0, 1, 2]
    run.write_json(RunDir.EVAL, {"top1": 50.0})
    assert run.read_eval() == {"top1": 50.0}
    assert run.read_optional_json(RunDir.POSTHOC) is None
    (run.path / RunDir.POSTHOC).write_text("[1, 2,")
    with pytest.raises(CheckpointError, match=r"posthoc\.json in .* is not valid JSON") as info:
        run.read_optional_json(RunDir.POSTHOC)
    _one_line(info)
    (run.path / RunDir.POSTHOC).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        run.read_optional_json(RunDir.POSTHOC)
    assert run.features_cache("best_val") == tmp_path / RunDir.FEATURES / "best_val.npz"


# ---------------------------------------------------------------- (b) the source scan

RUN_FILE_NAMES = ("config.yaml", "data.json", "metrics.jsonl", "last.pt", "best_val.pt", "prev.pt", "eval.json",
                  "predictions.npz", "config_history.jsonl", "sessions.jsonl")
PATTERN = re.compile(r"(?<![\w])(" + "|".join(re.escape(n) for n in RUN_FILE_NAMES) + r")(?![\w])")

# (module path under src/longtail, file name): why that module may spell it. Keep this short.
ALLOWED: dict[tuple[str, str], str] = {}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def run_file_names_in_code(path: Path) -> list[tuple[int, str]]:
    """(line, name) for each run-folder file name in a string constant of `path` that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [(node.lineno, m.group(1)) for m in PATTERN.finditer(node.value)]
    return sorted(found)


def test_the_scan_sees_code_and_skips_docstrings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Reads eval.json."""\n\ndef f(run):\n    """Writes config.yaml."""\n'
                      '    # metrics.jsonl\n    return run / "eval.json", f"{run}/checkpoints/last.pt", '
                      '"eval_logit_adjusted.json", "metadata.json"\n')
    assert run_file_names_in_code(sample) == [(6, "eval.json"), (6, "last.pt")]


def test_only_rundir_spells_run_folder_file_names():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "rundir.py":
            continue
        for line, name in run_file_names_in_code(path):
            if (rel, name) not in ALLOWED:
                offenders.append(f"{rel}:{line}: {name}")
    assert not offenders, ("use RunDir's constants, properties and methods instead of spelling run-folder file "
                           "names:\n" + "\n".join(offenders))
