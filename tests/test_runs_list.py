"""`longtail runs [DIR]`: every run folder under DIR with its recipe, epochs, status and accuracies.

Tiny digits runs trained through `main`: a finished CE run with a validation split (2 epochs), a
finished class-balanced run (1 epoch) one folder deeper, an interrupted run (a checkpoint, one
of two epochs, no eval.json) and a running one (its lock held by this test process).
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
import yaml

from longtail.cli import main
from longtail.runlock import RunLock


def _config(path, **over) -> str:
    cfg = {"data": {"source": "digits", "profile": "exp", "imbalance_ratio": 10, "test_per_class": 20, "seed": 0},
           "model": {"name": "small_cnn", "params": {"width": 4}},
           "loss": {"name": "ce"},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0, "eval_batch_size": 500,
                     "progress": False, "augment": {"crop_padding": 1, "flip": False}}}
    for key, value in over.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/ce (finished, val split), root/sub/cb (finished), root/cut (interrupted), root/live (running),
    root/notes (not a run)."""
    root = tmp_path_factory.mktemp("runs_list") / "runs"
    configs = tmp_path_factory.mktemp("configs")
    assert main(["train", _config(configs / "ce.yaml", **{"data.val_per_class": 5}), "--out", str(root / "ce"),
                 "--no-progress"]) == 0
    assert main(["train", _config(configs / "cb.yaml", **{"loss.name": "class_balanced", "train.epochs": 1,
                                                          "data.imbalance_ratio": 20}),
                 "--out", str(root / "sub" / "cb"), "--no-progress"]) == 0
    cut = root / "cut"  # killed after its first epoch: a checkpoint, one metrics line, no evaluation
    shutil.copytree(root / "ce", cut)
    (cut / "eval.json").unlink()
    (cut / "predictions.npz").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text(lines[0])
    shutil.copytree(root / "sub" / "cb", root / "live")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    return root


def _eval(run) -> dict:
    return json.loads((run / "eval.json").read_text())


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_table_lists_every_run_with_its_status(runs, capsys):
    with RunLock(runs / "live"):  # a training in progress holds its run's lock
        assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "method", "loss", "data", "epochs", "status", "left", "top1", "many", "medium",
                                "few", "best_val_top1"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows) == ["ce", "cut", "live", "sub/cb"]  # notes/ and checkpoints/ are no runs
    ce, cb = _eval(runs / "ce"), _eval(runs / "sub" / "cb")
    assert rows["ce"].split()[:7] == ["ce", "standard", "ce", "digits", "(ratio", "10)", "2/2"]
    assert "finished" in rows["ce"] and f"{ce['top1']:.2f}" in rows["ce"]
    assert f"{ce['best_val']['top1']:.2f}" in rows["ce"]
    assert "class_balanced" in rows["sub/cb"] and "(ratio 20)" in rows["sub/cb"] and " 1/1 " in rows["sub/cb"]
    assert "finished" in rows["sub/cb"] and f"{cb['top1']:.2f}" in rows["sub/cb"]
    assert " 1/2 " in rows["cut"] and "interrupted" in rows["cut"] and rows["cut"].rstrip().endswith("-")
    assert "running" in rows["live"]
    assert lines[-1] == "4 run(s): 1 running, 2 finished, 1 interrupted"
    assert main(["runs", str(runs)]) == 0  # released: no longer running
    assert "running" not in capsys.readouterr().out


def test_csv_parses_back_to_the_run_files(runs, capsys):
    assert main(["runs", str(runs), "--csv"]) == 0
    rows = {r["run"]: r for r in _csv(capsys.readouterr().out)}
    assert list(rows) == ["ce", "cut", "live", "sub/cb"]
    ce = _eval(runs / "ce")
    r = rows["ce"]
    assert (r["method"], r["loss"], r["sampler"], r["reweight"], r["source"]) == ("standard", "ce", "instance", "none",
                                                                                "digits")
    assert (float(r["imbalance_ratio"]), r["epochs_done"], r["epochs_planned"], r["status"]) == (10, "2", "2",
                                                                                                 "finished")
    for key in ("top1", "many", "medium", "few"):
        assert (float(r[key]) if r[key] else None) == ce[key]
        assert (float(r[f"best_val_{key}"]) if r[f"best_val_{key}"] else None) == ce["best_val"][key]
    assert rows["sub/cb"]["best_val_top1"] == ""  # no validation split
    assert (rows["cut"]["status"], rows["cut"]["epochs_done"], rows["cut"]["top1"]) == ("interrupted", "1", "")
    assert main(["runs", str(runs), "--format", "csv"]) == 0
    assert {r["run"]: r for r in _csv(capsys.readouterr().out)} == rows


def test_sort_and_reverse(runs, capsys):
    def order(*args) -> list[str]:
        assert main(["runs", str(runs), "--csv", *args]) == 0
        return [r["run"] for r in _csv(capsys.readouterr().out)]

    top1 = {name: _eval(runs / name)["top1"] for name in ("ce", "live", "sub/cb")}
    ascending = sorted(top1, key=lambda n: (top1[n], n))
    assert order("--sort", "top1") == [*ascending, "cut"]  # no top-1: last
    descending = sorted(top1, key=lambda n: (-top1[n], n))
    assert order("--sort", "top1", "--reverse") == [*descending, "cut"]  # still last
    assert order("--sort", "loss") == ["ce", "cut", "live", "sub/cb"]  # 'ce' < 'class_balanced'; ties by run
    assert order("--sort", "loss", "--reverse") == ["live", "sub/cb", "ce", "cut"]
    assert order("--sort", "epochs", "--reverse") == ["ce", "cut", "live", "sub/cb"]  # 2 epochs, then 1
    assert order("--sort", "data", "--reverse") == ["live", "sub/cb", "ce", "cut"]  # ratio 20 above ratio 10


def _long_run(runs, tmp_path, *, epochs: int, seconds: list[float], starts: list[int] | None = None):
    """runs/cut copied to tmp_path/runs/long with train.epochs `epochs`, one metrics row per entry of
    `seconds` and, with `starts`, a sessions.jsonl row per session start; returns its folder."""
    run = tmp_path / "runs" / "long"
    if not run.exists():
        shutil.copytree(runs / "cut", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["epochs"] = epochs
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = json.loads((runs / "cut" / "metrics.jsonl").read_text().splitlines()[0])
    (run / "metrics.jsonl").write_text("".join(json.dumps({**row, "epoch": e + 1, "seconds": s}) + "\n"
                                               for e, s in enumerate(seconds)))
    if starts is not None:
        (run / "sessions.jsonl").write_text("".join(json.dumps({"start_epoch": s}) + "\n" for s in starts))
    return run


def test_time_left_is_the_median_epoch_times_the_epochs_to_go(runs, tmp_path, capsys):
    """An unfinished run's `left`: the median `seconds` of its last 10 epochs (an epoch that held a
    pause does not move it) times the epochs still to train; finished runs have none."""
    seconds = [50.0, 50.0, 10.0, 12.0, 11.0, 13.0, 900.0, 12.0, 14.0, 11.0, 12.0, 13.0]  # 12 epochs, one paused
    _long_run(runs, tmp_path, epochs=30, seconds=seconds)
    assert main(["runs", str(tmp_path / "runs"), "--csv"]) == 0
    (r,) = _csv(capsys.readouterr().out)
    median = 12.0  # of the last 10, sorted: 10 11 11 12 12 | 12 13 13 14 900
    assert (r["status"], r["epochs_done"], float(r["epoch_seconds"])) == ("interrupted", "12", median)
    assert float(r["seconds_left"]) == median * 18
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[6:10] == ["12/30", "interrupted", "3.6", "min"]  # 216 s
    assert main(["runs", str(runs), "--csv"]) == 0
    rows = {r["run"]: r for r in _csv(capsys.readouterr().out)}
    assert rows["ce"]["seconds_left"] == rows["ce"]["epoch_seconds"] == ""  # finished
    cut = json.loads((runs / "cut" / "metrics.jsonl").read_text())
    assert float(rows["cut"]["seconds_left"]) == pytest.approx(cut["seconds"])  # 1 of 2 epochs to go


def test_time_left_leaves_out_each_sessions_first_epoch(runs, tmp_path, capsys):
    """A session's first epoch holds its start-up: with sessions.jsonl it is left out of the median
    while other epochs remain (two epochs, 658 s and 41 s: 41 s an epoch, not their mean)."""
    def write(seconds, starts):
        _long_run(runs, tmp_path, epochs=200, seconds=seconds, starts=starts)
        assert main(["runs", str(tmp_path / "runs"), "--csv"]) == 0
        (r,) = _csv(capsys.readouterr().out)
        return float(r["epoch_seconds"]), float(r["seconds_left"])

    assert write([658.0, 41.0], [0]) == (41.0, 41.0 * 198)
    assert write([658.0], [0]) == (658.0, 658.0 * 199)  # nothing else to go by
    # resumed after epoch 3: epochs 1 and 4 are first epochs; the median of 40 42 44 is 42
    assert write([300.0, 40.0, 42.0, 500.0, 44.0], [0, 3]) == (42.0, 42.0 * 195)
    (tmp_path / "runs" / "long" / "sessions.jsonl").unlink()  # a run trained before sessions were recorded: every epoch counts
    assert main(["runs", str(tmp_path / "runs"), "--csv"]) == 0
    assert float(_csv(capsys.readouterr().out)[0]["epoch_seconds"]) == 44.0  # median of 300 40 42 500 44


def test_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    cases = ((["runs", str(tmp_path / "missing")], f"folder not found: {tmp_path / 'missing'}"),
             (["runs", str(runs / "notes" / "todo.txt")], "not a folder: "),
             (["runs", str(runs), "--sort", "top"], "unknown sort key 'top' (did you mean 'top1'?)"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("longtail: error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.chdir(tmp_path)  # the default DIR is runs/
    assert main(["runs"]) == 2 and "folder not found: runs" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    assert main(["runs"]) == 0 and capsys.readouterr().out == "no run folders under runs (a run folder holds " \
                                                              "config.yaml)\n"
    assert main(["runs", "--csv"]) == 0 and capsys.readouterr().out.startswith("run,method,loss,")


def test_a_run_folder_given_itself_and_an_unreadable_eval(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs / "sub" / "cb", broken)
    (broken / "eval.json").write_text("{not json")
    assert main(["runs", str(broken), "--csv"]) == 0
    captured = capsys.readouterr()
    (row,) = _csv(captured.out)
    assert row["run"] == str(broken) and row["status"] == "unreadable"
    assert "longtail: warning: " in captured.err and "eval.json in" in captured.err


def test_a_post_hoc_run_trains_no_epochs(runs, tmp_path, capsys):
    stage1 = str(runs / "ce" / "checkpoints" / "last.pt")
    config = _config(tmp_path / "tau.yaml", **{"method.name": "tau_norm", "method.params": {"stage1": stage1},
                                               "data.val_per_class": 5})
    assert main(["train", config, "--out", str(tmp_path / "found" / "tau"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "found")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["tau", "tau_norm"] and row[6:8] == ["post-hoc", "finished"]
    assert main(["runs", str(tmp_path / "found"), "--csv"]) == 0
    (r,) = _csv(capsys.readouterr().out)
    assert (r["epochs_done"], r["epochs_planned"], r["status"]) == ("", "", "finished")


def test_a_pretraining_run_shows_its_pretext_task(tmp_path, capsys):
    """An SSP pre-training run (eval.json task 'rotation'): its method names the task, top-1 is the
    rotation accuracy, and no shot groups of rotations are shown."""
    config = _config(tmp_path / "ssp.yaml", **{"method.name": "ssp", "train.epochs": 1, "data.val_per_class": 5})
    assert main(["train", config, "--out", str(tmp_path / "found" / "ssp"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "found"), "--csv"]) == 0
    (r,) = _csv(capsys.readouterr().out)
    ev = _eval(tmp_path / "found" / "ssp")
    assert ev["task"] == "rotation" and ev["many"] is not None
    assert (r["method"], float(r["top1"]), float(r["best_val_top1"])) == ("ssp (rotation task)", ev["top1"],
                                                                        ev["best_val"]["top1"])
    assert r["many"] == r["medium"] == r["few"] == r["best_val_many"] == ""
