"""`longtail bench`: grid validation, stage-1 sharing, resume of an interrupted grid, tables
equal to the eval.json files; and every YAML under configs/ loads and starts with its command."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from longtail import losses, methods  # noqa: F401  (registration)
from longtail.bench import load_grid, plan
from longtail.cli import main
from longtail.config import diff_configs, load_config, read_yaml
from longtail.data import samplers  # noqa: F401
from longtail.dist import cpu_model
from longtail.log import format_duration
from longtail.registry import LOSSES, METHODS, SAMPLERS
from longtail.rundir import RunDir

BASE = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 10, "val_per_class": 2},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "milestones": [], "progress": False}}


def write_grid(folder: Path, methods: list[dict], **keys) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"name": "digits grid", "base": str(folder / "base.yaml"), "out": str(folder / "out"),
            "imbalance_ratios": [10], "seeds": [0, 1], "methods": methods, **keys}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


METHODS_OF_GRID = [
    {"name": "ce", "logit_adjust_tau": 1.0},
    {"name": "bs", "overrides": {"loss.name": "balanced_softmax"}},
    {"name": "crt", "overrides": {"method.name": "crt", "sampler.name": "class_aware"}, "stage1": "ce"},
]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The grid run once through the CLI: 2 seeds x (ce, bs, crt on ce)."""
    folder = tmp_path_factory.mktemp("grid")
    path = write_grid(folder, METHODS_OF_GRID)
    assert main(["bench", str(path), "--no-progress"]) == 0
    return path, folder / "out"


def test_tables_equal_the_eval_json_files(grid_run):
    path, out = grid_run
    rows = list(csv.DictReader((out / "results.csv").open()))
    md = (out / "results.md").read_text()
    assert {r["method"] for r in rows} == {"ce", "ce + post-hoc LA", "bs", "crt"}
    for r in rows:
        method = r["method"].removesuffix(" + post-hoc LA")
        name = "eval_logit_adjusted.json" if r["method"].endswith("LA") else "eval.json"
        files = [json.loads((out / method / "ratio10" / f"seed{s}" / name).read_text()) for s in (0, 1)]
        if r["table"] == "best_val":
            files = [f["best_val"] for f in files]
        assert r["seeds"] == "0;1" and r["seeds_finished"] == "2"
        for metric in ("top1", "many", "medium", "few"):
            values = [f[metric] for f in files]
            if None in values:
                assert r[f"{metric}_mean"] == "" and r[f"{metric}_std"] == ""
                continue
            assert float(r[f"{metric}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
            assert float(r[f"{metric}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)  # ddof = 1
            assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" in md
    assert "## Best on validation, test set" in md and "| crt | " in md


def test_four_group_tables_read_four_group(grid_run, capsys):
    path, out = grid_run
    four = path.parent / "grid_four.yaml"
    four.write_text(path.read_text() + "groups: four\n")
    assert main(["bench", str(four), "--table-only"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert "rare_mean" in rows[0] and "| method | ratio 10 top-1 | many | medium | few | rare |" in (out / "results.md").read_text()
    for r in (r for r in rows if r["method"] == "ce" and r["table"] == "last"):
        files = [json.loads((out / "ce" / "ratio10" / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)]
        for metric in ("many", "medium", "few", "rare"):
            values = [f["four_group"][metric] for f in files]
            if None in values:
                assert r[f"{metric}_mean"] == ""
            else:
                assert float(r[f"{metric}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert float(r["top1_mean"]) == pytest.approx(statistics.mean(f["top1"] for f in files), abs=1e-12)
    assert main(["bench", str(path), "--table-only"]) == 0  # back to the three groups
    assert "rare_mean" not in (out / "results.csv").read_text()


def test_stage2_cells_share_their_seeds_stage1(grid_run):
    _, out = grid_run
    for seed in (0, 1):
        cfg = read_yaml(out / "crt" / "ratio10" / f"seed{seed}" / "config.yaml")
        assert cfg["method"]["params"]["stage1"] == str(out / "ce" / "ratio10" / f"seed{seed}" / "checkpoints/last.pt")
        assert cfg["train"]["seed"] == seed and cfg["data"]["imbalance_ratio"] == 10.0
        info = json.loads((out / "crt" / "ratio10" / f"seed{seed}" / "bench.json").read_text())
        assert info["stage1"] == f"ce/ratio10/seed{seed}" and info["mode"] == "new" and info["wall_seconds"] > 0
    assert not (out / "crt" / "ratio10" / "seed0" / "eval_logit_adjusted.json").exists()


def test_second_invocation_skips_finished_cells(grid_run, monkeypatch, capsys):
    path, out = grid_run
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/ratio10/seed*/eval.json")}
    assert len(stamps) == 6

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("longtail.bench.runner.train_run", no_training)
    assert main(["bench", str(path)]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/ratio10/seed*/eval.json")}
    assert main(["bench", str(path), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "done    ce/ratio10/seed0"


def test_interrupted_grid_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    from longtail.runs import train_run as real_train_run
    from longtail.engine.loop import Trainer

    path = write_grid(tmp_path, METHODS_OF_GRID[:2], seeds=[0], overrides={"train.epochs": 2})
    save = Trainer.save
    saved = []

    def stop_in_second_cell(self, epoch):
        save(self, epoch)
        saved.append(epoch)
        if len(saved) == 3:  # ce's two epochs, then the first epoch of bs
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", stop_in_second_cell)
    assert main(["bench", str(path), "--no-progress"]) == 130
    ce, bs = tmp_path / "out/ce/ratio10/seed0", tmp_path / "out/bs/ratio10/seed0"
    assert (ce / "eval.json").is_file() and not (bs / "eval.json").exists() and (bs / "checkpoints/last.pt").is_file()
    assert not (tmp_path / "out/results.md").exists()
    monkeypatch.setattr(Trainer, "save", save)
    capsys.readouterr()
    assert main(["bench", str(path), "--list"]) == 0
    done, resume = capsys.readouterr().out.splitlines()
    assert done.split() == ["done", "ce/ratio10/seed0"]
    left = json.loads((bs / "metrics.jsonl").read_text())["seconds"]  # one epoch to go, at its one epoch's time
    assert resume == f"resume  bs/ratio10/seed0  [1/2 epochs, interrupted, {format_duration(left)} left]"
    calls = []

    def recording(cfg, out, **kw):
        if kw.get("resume"):  # the saved config, with the grid's session keys only
            changed = set(diff_configs(cfg, RunDir(out).read_config()))
            assert "train.test_curve_from" in changed and changed <= {"train.test_curve_from", "train.progress"}
        calls.append((Path(out).name, kw.get("resume", False)))
        return real_train_run(cfg, out, **kw)

    monkeypatch.setattr("longtail.bench.runner.train_run", recording)
    stamp = (ce / "eval.json").stat().st_mtime_ns
    # with a session key as an override: the finished cell is not "another config", the resumed
    # cell takes it for its session (train.test_curve_from: test top-1 from epoch 2 on)
    assert main(["bench", str(path), "--no-progress", "train.test_curve_from=2"]) == 0
    assert calls == [("seed0", True)]  # only bs, resumed from its saved config and checkpoint
    rows = [json.loads(line) for line in (bs / "metrics.jsonl").read_text().splitlines()]
    assert "test_curve_top1" not in rows[0] and rows[1]["test_curve_top1"] == json.loads((bs / "eval.json").read_text())["top1"]
    assert RunDir(bs).read_config().train.test_curve_from == 0  # the session's only
    assert (ce / "eval.json").stat().st_mtime_ns == stamp
    assert [r["epoch"] for r in map(json.loads, (bs / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert json.loads((bs / "eval.json").read_text())["epoch"] == 2
    assert json.loads((bs / "bench.json").read_text())["mode"] == "resume"


def test_table_only_and_a_changed_grid(grid_run, tmp_path, capsys):
    path, out = grid_run
    (out / "results.md").unlink()
    assert main(["bench", str(path), "--table-only"]) == 0
    assert (out / "results.md").is_file() and "| ce | " in capsys.readouterr().out
    assert main(["bench", str(path), "train.lr=0.05", "--table-only"]) == 2
    err = capsys.readouterr().err
    assert "cell ce/ratio10/seed0" in err and "another config (train.lr)" in err and err.count("\n") == 1


def test_a_grid_folder_copied_elsewhere_keeps_its_stage2_cells(grid_run, tmp_path, capsys):
    """The crt cells' configs name ce's last.pt under the old out; a copy of the whole folder (another
    machine, benchmarks/artifacts) still tables, and a stage 1 outside the grid is still refused."""
    path, out = grid_run
    moved = tmp_path / "artifacts" / "grid"
    shutil.copytree(out, moved)
    saved = (moved / "crt" / "ratio10" / "seed0" / "config.yaml").read_text()
    assert str(out / "ce" / "ratio10" / "seed0" / "checkpoints" / "last.pt") in saved
    assert main(["bench", str(path), "--out", str(moved), "--table-only"]) == 0
    assert "| crt | " in capsys.readouterr().out
    assert main(["bench", str(path), "--out", str(moved), "--list"]) == 0
    assert all(line.startswith("done") for line in capsys.readouterr().out.splitlines())
    elsewhere = saved.replace(str(out / "ce" / "ratio10" / "seed0"), str(tmp_path / "mine" / "seed0"))
    (moved / "crt" / "ratio10" / "seed0" / "config.yaml").write_text(elsewhere)
    assert main(["bench", str(path), "--out", str(moved), "--table-only"]) == 2
    assert "another config (method.params.stage1)" in capsys.readouterr().err


def test_best_test_epoch_table_is_the_test_curves_maximum(grid_run, tmp_path):
    """With train.test_curve_from, a third table: each cell's highest test_curve_top1 and that
    epoch's groups, over the seeds; rows without a curve (bs here) are left out of it."""
    methods = [METHODS_OF_GRID[0], {**METHODS_OF_GRID[1], "overrides": {**METHODS_OF_GRID[1]["overrides"],
                                                                      "train.test_curve_from": 0}}]
    path = write_grid(tmp_path, methods, overrides={"train.epochs": 3, "train.test_curve_from": 2})
    assert main(["bench", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    rows = {(r["table"], r["method"]): r for r in csv.DictReader((out / "results.csv").open())}
    for method in ("ce",):
        best = []
        for seed in (0, 1):
            metrics = [json.loads(line) for line in (out / method / "ratio10" / f"seed{seed}" / "metrics.jsonl")
                       .read_text().splitlines()]
            assert [m["epoch"] for m in metrics if "test_curve_top1" in m] == [2, 3]
            best.append(max(metrics, key=lambda m: m.get("test_curve_top1", -1)))
        row = rows[("best_test", method)]
        assert float(row["top1_mean"]) == pytest.approx(statistics.mean(b["test_curve_top1"] for b in best), abs=1e-12)
        assert float(row["many_mean"]) == pytest.approx(statistics.mean(b["test_curve_many"] for b in best), abs=1e-12)
    assert ("best_test", "bs") not in rows and ("best_test", "ce + post-hoc LA") not in rows
    md = (out / "results.md").read_text()
    section = md.split("## Best test epoch of the test curve (diagnostic, never a selection)")[1].split("## Cells")[0]
    assert "| ce | " in section and "| bs | " not in section and "nothing selects on it" in section
    assert "Best test epoch" not in (grid_run[1] / "results.md").read_text()  # no test curve, no table


def test_a_pretraining_cell_is_tabled_as_its_pretext_task(tmp_path):
    """SSP's cell scores 4-way rotations (eval.json `task`): its row says so and holds that top-1
    only, in every table (the test curve's too), never shot groups of rotations; its fine-tuning
    cell is an ordinary row."""
    methods = [{"name": "ssp", "overrides": {"method.name": "ssp", "train.test_curve_from": 1}},
               {"name": "ssp_ce", "weights_from": "ssp"}]
    path = write_grid(tmp_path, methods, seeds=[0], baseline="ssp_ce")
    assert main(["bench", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    rows = {(r["table"], r["method"]): r for r in csv.DictReader((out / "results.csv").open())}
    ev = json.loads((out / "ssp" / "ratio10" / "seed0" / "eval.json").read_text())
    curve = [json.loads(line) for line in (out / "ssp" / "ratio10" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert ev["task"] == "rotation"
    row = "ssp (rotation pre-training task)"
    for table, top1 in (("last", ev["top1"]), ("best_val", ev["best_val"]["top1"]),
                        ("best_test", max(r["test_curve_top1"] for r in curve))):
        r = rows[(table, row)]
        assert float(r["top1_mean"]) == top1 and r["many_mean"] == r["medium_mean"] == r["few_mean"] == ""
    assert ("last", "ssp") not in rows and ("best_test", "ssp_ce") not in rows
    assert not [key for key in rows if key[0] == "gain"]  # rotations are no gain over a classifier
    path = write_grid(tmp_path, methods, seeds=[0], baseline="ssp")  # nor a classifier's over rotations
    assert main(["bench", str(path), "--table-only"]) == 0
    assert not [r for r in csv.DictReader((out / "results.csv").open()) if r["table"] == "gain"]
    ft = json.loads((out / "ssp_ce" / "ratio10" / "seed0" / "eval.json").read_text())
    assert float(rows[("last", "ssp_ce")]["top1_mean"]) == ft["top1"] and rows[("last", "ssp_ce")]["many_mean"]
    md = (out / "results.md").read_text()
    assert f"| {row} | {ev['top1']:.2f} | - | - | - |" in md and "scored on its pretext task" in md


def test_gain_table_subtracts_the_baseline_cell_of_each_seed(grid_run, tmp_path):
    """`baseline: ce`: a fourth table of each method's last-epoch numbers minus ce's of the same
    seed (mean and sample std of the paired differences), the paper's gain beside it."""
    path, out = grid_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    methods = [dict(m) for m in METHODS_OF_GRID]
    methods[1].update(published={10: 75.0}, published_baseline={10: 71.5}, published_source="Paper, Table 1")
    gain_grid = write_grid(tmp_path, methods, baseline="ce")
    assert main(["bench", str(gain_grid), "--out", str(copy), "--table-only"]) == 0
    rows = {(r["table"], r["method"]): r for r in csv.DictReader((copy / "results.csv").open())}
    ce = [json.loads((out / "ce" / "ratio10" / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)]
    assert {m for t, m in rows if t == "gain"} == {"ce + post-hoc LA", "bs", "crt"}  # not ce itself
    la = [json.loads((out / "ce" / "ratio10" / f"seed{s}" / "eval_logit_adjusted.json").read_text()) for s in (0, 1)]
    assert float(rows[("gain", "ce + post-hoc LA")]["top1_mean"]) == pytest.approx(
        statistics.mean(a["top1"] - c["top1"] for a, c in zip(la, ce)), abs=1e-12)
    for method in ("bs", "crt"):
        ev = [json.loads((out / method / "ratio10" / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)]
        row = rows[("gain", method)]
        for metric in ("top1", "many"):
            diffs = [e[metric] - c[metric] for e, c in zip(ev, ce)]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(diffs), abs=1e-12)
    assert float(rows[("gain", "bs")]["published_top1"]) == pytest.approx(3.5)
    assert rows[("gain", "crt")]["published_top1"] == "" and rows[("last", "bs")]["published_top1"] == "75.0"
    md = (copy / "results.md").read_text()
    section = md.split("## Gain over ce (last epoch), beside the paper's own gain")[1].split("## Cells")[0]
    assert "| bs | " in section and " | +3.50 | " in section and "| ce | " not in section
    assert "Gain over" not in (out / "results.md").read_text()  # no baseline, no gain table


def test_dlsa_rows_come_from_the_cells_dlsa_results(grid_run, tmp_path, capsys):
    """`longtail dlsa CELL --out CELL/dlsa` (benchmarks/full_protocol.sh) adds a '<method> + DLSA'
    row: last epoch from dlsa.last, best on validation from dlsa_val_selected, over the seeds."""
    path, out = grid_run
    copy = tmp_path / "grid"
    shutil.copytree(out, copy)
    flow = ["--clusters", "8", "--depth", "2", "--flow-epochs", "2", "--flow-batch", "64", "--cls-epochs", "3"]
    results = []
    for seed in (0, 1):
        cell = copy / "ce" / "ratio10" / f"seed{seed}"
        assert main(["dlsa", str(cell), "--out", str(cell / "dlsa"), *flow]) == 0
        results.append(json.loads((cell / "dlsa" / "dlsa.json").read_text()))
    capsys.readouterr()
    assert main(["bench", str(path), "--out", str(copy), "--table-only"]) == 0
    rows = {(r["table"], r["method"]): r for r in csv.DictReader((copy / "results.csv").open())}
    assert ("last", "bs + DLSA") not in rows
    for table, values in (("last", [r["dlsa"]["last"]["top1"] for r in results]),
                          ("best_val", [r["dlsa_val_selected"]["top1"] for r in results])):
        row = rows[(table, "ce + DLSA")]
        assert row["seeds"] == "0;1" and row["published_top1"] == ""
        assert float(row["top1_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
    md = (copy / "results.md").read_text()
    assert "| ce + DLSA | " in md and "dlsa/dlsa.json for the '+ DLSA' rows" in md
    # DLSA on another checkpoint is not the row's reading: refused, naming the file
    bad = copy / "ce" / "ratio10" / "seed1" / "dlsa" / "dlsa.json"
    bad.write_text(json.dumps({**results[1], "checkpoint": "best_val"}))
    assert main(["bench", str(path), "--out", str(copy), "--table-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad} is not `longtail dlsa` on the cell's last checkpoint" in err[0]


def test_methods_filter_needs_finished_stage1(tmp_path, capsys):
    path = write_grid(tmp_path, METHODS_OF_GRID)
    assert main(["bench", str(path), "--methods", "crt"]) == 2
    assert "needs its stage 1 ce/ratio10/seed0, which is not finished" in capsys.readouterr().err
    assert main(["bench", str(path), "--methods", "cr"]) == 2
    assert "'cr' is not a method of grid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"epochz": 1}, "unknown key 'epochz' in grid"),
    ({"groups": "five"}, "grid key 'groups' must be one of three, four, got 'five'"),
    ({"methods": [{"name": "ce", "confg": "x.yaml"}]},
     "unknown key 'confg' in grid methods[0] (did you mean 'config'?)"),
    ({"methods": [{"name": "ce", "config": "missing.yaml"}]}, "grid method 'ce': config file not found: missing.yaml"),
    ({"methods": [{"name": "ce"}, {"name": "crt", "overrides": {"method.name": "crt"}, "stage1": "cee"}]},
     "grid method 'crt': stage1 'cee' is not a method of the grid (did you mean 'ce'?)"),
    ({"methods": [{"name": "a", "overrides": {"method.name": "crt"}, "stage1": "b"},
                  {"name": "b", "overrides": {"method.name": "lws"}, "stage1": "a"}]},
     "stage-1 / branch references form a cycle: a -> b -> a"),
    ({"methods": [{"name": "ce"}, {"name": "drw", "branch_from": "ce"}]},
     "grid method 'drw': branch_from and branch_epoch go together"),
    ({"methods": [{"name": "ce"}, {"name": "drw", "branch_from": "cee", "branch_epoch": 1}]},
     "grid method 'drw': branch_from 'cee' is not a method of the grid (did you mean 'ce'?)"),
    ({"methods": [{"name": "ce"}, {"name": "drw", "branch_from": "ce", "branch_epoch": 0}]},
     "branch_epoch must be an integer >= 1"),
    ({"methods": [{"name": "ce"}, {"name": "drw", "branch_from": "ce", "branch_epoch": 5}]},
     "grid method 'drw': branch_epoch 5 is after the last epoch of 'ce' (1)"),
    ({"methods": [{"name": "ce"}, {"name": "crt", "overrides": {"method.name": "crt"}, "stage1": "ce"},
                  {"name": "drw", "branch_from": "crt", "branch_epoch": 1}]},
     "branch_from 'crt' must be a one-stage method that branches from nothing itself"),
    ({"methods": [{"name": "crt", "overrides": {"method.name": "crt"}}]},
     "grid method 'crt' (crt) is a stage-2 method: name its stage-1 method"),
    ({"methods": [{"name": "ce"}, {"name": "bs", "stage1": "ce"}]}, "grid method 'bs' (standard) takes no stage 1"),
    ({"methods": [{"name": "ce"}, {"name": "ce"}]}, "grid method 'ce' is listed twice"),
    ({"methods": [{"name": "ce", "overrides": ["train.seed=3"]}]}, "the grid sets train.seed per cell"),
    ({"methods": [{"name": "ce", "overrides": {"train.lrr": 0.1}}]},
     "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ({"seeds": [0, 0]}, "grid key 'seeds' repeats a value"),
    ({"imbalance_ratios": [0.5]}, "grid key 'imbalance_ratios' must be a non-empty list of numbers >= 1"),
    ({"methods": [{"name": "x/y"}]}, "name must be letters, digits"),
    ({"baseline": "cee"}, "grid key 'baseline': 'cee' is not a method of the grid (did you mean 'ce'?)"),
    ({"methods": [{"name": "ce", "published": {10: 70.0}, "published_source": "P, T1",
                   "published_baseline": {10: 69.0}}]},
     "grid method 'ce': published_baseline needs the grid key 'baseline'"),
    ({"baseline": "ce", "methods": [{"name": "ce", "published_baseline": {10: 69.0}}]},
     "grid method 'ce': published_baseline at ratio 10 needs the method's own published number there"),
    ({"methods": [{"name": "ce", "published": {10: 170.0}, "published_source": "P"}]},
     "grid method 'ce': published must map imbalance ratios to top-1 percentages"),
])
def test_bad_grids_are_one_line_errors(tmp_path, capsys, change, message):
    path = write_grid(tmp_path, [{"name": "ce"}])
    grid = yaml.safe_load(path.read_text())
    grid.update(change)
    path.write_text(yaml.safe_dump(grid))
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_branching_cells_share_their_sources_plain_ce_prefix(tmp_path, capsys):
    drw = {"name": "drw", "overrides": {"reweight.scheme": "effective_number", "reweight.start_epoch": 1},
           "branch_from": "ce", "branch_epoch": 1}
    path = write_grid(tmp_path, [{"name": "ce"}, drw], overrides={"train.epochs": 2}, seeds=[0])
    assert main(["bench", str(path), "--list"]) == 0
    assert "new     drw/ratio10/seed0  (from ce/ratio10/seed0 at epoch 1)" in capsys.readouterr().out
    assert main(["bench", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert (out / "ce/ratio10/seed0/checkpoints/epoch1.pt").is_file()
    assert read_yaml(out / "ce/ratio10/seed0/config.yaml")["train"]["save_epochs"] == [1]
    branch = json.loads((out / "drw/ratio10/seed0/branch.json").read_text())
    assert branch == {"from": str(out / "ce/ratio10/seed0/checkpoints/epoch1.pt"), "epoch": 1}
    assert json.loads((out / "drw/ratio10/seed0/bench.json").read_text())["branch"] == "ce/ratio10/seed0@1"
    rows = [json.loads(r) for r in (out / "drw/ratio10/seed0/metrics.jsonl").read_text().splitlines()]
    ce_rows = [json.loads(r) for r in (out / "ce/ratio10/seed0/metrics.jsonl").read_text().splitlines()]
    assert rows[0] == ce_rows[0] and rows[1]["train_loss"] != ce_rows[1]["train_loss"]
    assert "ce @ epoch 1" in (out / "results.md").read_text()
    # the machines: the branch carries its source's session for the prefix; its own epoch is its own
    sessions = [json.loads(r) for r in (out / "drw/ratio10/seed0/sessions.jsonl").read_text().splitlines()]
    assert [s["start_epoch"] for s in sessions] == [0, 1]
    label = sessions[1]["machine"]["label"]
    assert cpu_model() in label and sessions[0]["machine"] == json.loads(
        (out / "ce/ratio10/seed0/sessions.jsonl").read_text())["machine"]
    assert json.loads((out / "drw/ratio10/seed0/bench.json").read_text())["machines"] == {label: 1}
    assert json.loads((out / "ce/ratio10/seed0/bench.json").read_text())["machines"] == {
        sessions[0]["machine"]["label"]: 2}
    md = (out / "results.md").read_text()
    assert f"| {label} (1 epochs) |" in md and f"| {sessions[0]['machine']['label']} (2 epochs) |" in md


def test_a_branch_source_without_its_checkpoint_is_a_clear_error(tmp_path, capsys):
    path = write_grid(tmp_path, [{"name": "ce"}], overrides={"train.epochs": 2}, seeds=[0])
    assert main(["bench", str(path), "--no-progress"]) == 0  # ce ran before drw was added
    drw = {"name": "drw", "overrides": {"reweight.scheme": "effective_number", "reweight.start_epoch": 1},
           "branch_from": "ce", "branch_epoch": 1}
    path = write_grid(tmp_path, [{"name": "ce"}, drw], overrides={"train.epochs": 2}, seeds=[0])
    capsys.readouterr()
    assert main(["bench", str(path), "--no-progress"]) == 2
    assert "which its source cell did not keep (it ran without train.save_epochs [1])" in capsys.readouterr().err
    assert not (tmp_path / "out/drw").exists()


CONFIG_DIRS = ("cifar10_lt", "cifar10_lt_full", "cifar100_lt")


def test_every_config_loads_and_starts_with_its_command():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) > 50
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        first = path.read_text().splitlines()[0]
        assert first.startswith("# longtail "), rel
        if path.parent.name == "grids":
            assert first.startswith(f"# longtail bench {rel}"), rel
        else:
            assert first.startswith(f"# longtail train {rel} --out "), rel
            load_config(path)


def test_every_registered_loss_method_and_sampler_has_a_config():
    for folder in CONFIG_DIRS:
        cfgs = [load_config(p) for p in sorted((REPO / "configs" / folder).glob("*.yaml"))]
        used = {"loss": {c.loss.name for c in cfgs}, "method": {c.method.name for c in cfgs},
                "sampler": {c.sampler.name for c in cfgs}}
        assert set(LOSSES.names()) <= used["loss"], (folder, set(LOSSES.names()) - used["loss"])
        assert set(METHODS.names()) <= used["method"], (folder, set(METHODS.names()) - used["method"])
        assert set(SAMPLERS.names()) <= used["sampler"], (folder, set(SAMPLERS.names()) - used["sampler"])
        assert any(c.train.mixup_alpha > 0 for c in cfgs) and any(c.reweight.start_epoch > 0 for c in cfgs)


def test_shipped_grids_resolve(monkeypatch):
    monkeypatch.chdir(REPO)  # grid paths are relative to the folder longtail runs in
    cpu = load_grid("configs/grids/cifar10_lt_cpu.yaml", out="/nonexistent/cpu")
    assert [m.name for m in cpu.methods] == ["ce", "focal", "cb_focal", "ldam_drw", "balanced_softmax",
                                             "logit_adjustment", "seesaw", "class_balanced", "ce_drw", "swrm",
                                             "dyswrm", "crt", "lws", "tau_norm"]
    assert {c.cfg.train.epochs for c in cpu.cells if c.stage1 is None} == {30}
    assert all(c.stage1.method == "ce" for c in cpu.cells if c.method in ("crt", "lws", "tau_norm"))
    branched = [c for c in cpu.cells if c.branch_source is not None]
    assert sorted(c.method for c in branched) == ["ce_drw", "dyswrm", "swrm"]
    assert all(c.branch_source.method == "ce" and c.branch_epoch == 24 for c in branched)
    assert next(c for c in cpu.cells if c.method == "ce").cfg.train.save_epochs == [24]
    assert [state for _, state in plan(cpu)] == ["new"] * 14
    full = load_grid("configs/grids/cifar10_lt_full.yaml", out="/nonexistent/full")
    assert full.ratios == [100, 10] and full.seeds == [0, 1, 2] and len(full.cells) == 132
    at_10 = {c.method for c in full.cells if c.ratio == 10}
    assert {"ce", "ldam_drw", "balanced_softmax", "ssp_drw", "swrm", "dyswrm", "ghm_cwap_aura", "lcreg"} <= at_10
    assert not {"focal", "crt", "lcreg_no_aug"} & at_10  # ratio 100 only (issue 22)
    for c in full.cells:
        assert c.cfg.train.device == "auto"
        if c.stage1 is None and c.method != "ssp":  # SSP pre-training: one milestone (docs/ssp.md)
            assert (c.cfg.train.epochs, c.cfg.train.warmup_epochs, c.cfg.train.milestones) == (200, 5, [160, 180])
    drw = next(c for c in full.cells if c.method == "ldam_drw")
    assert drw.cfg.reweight.start_epoch == 160
    assert {c.branch_epoch for c in full.cells if c.branch_source is not None} == {160}
    ssp_drw = next(c for c in full.cells if c.method == "ssp_drw")
    assert ssp_drw.weights_source.method == "ssp" and ssp_drw.cfg.model.weights == str(ssp_drw.weights_source.run.last)
    assert full.method("ce").published == {100.0: 70.4, 10.0: 86.4}
    assert full.baseline == "ce" and full.method("mislas").published_baseline == {100.0: 70.4, 10.0: 86.4}
    for spec in full.methods:  # each paper's CE row of the table its published number comes from
        assert set(spec.published_baseline) == (set(spec.published) if spec.name != "ce" else set()), spec.name
    fp32 = load_grid("configs/grids/cifar10_lt_full_fp32.yaml", out="/nonexistent/fp32")
    assert fp32.ratios == [100] and fp32.seeds == [0]
    for c in fp32.cells:  # the bf16 cell's config, only the precision pinned to fp32
        twin = next(t for t in full.cells if (t.method, t.ratio, t.seed) == (c.method[:-len("_fp32")], 100, 0))
        extra = {"train.save_epochs"} if c.method == "ce_fp32" else set()  # the twin saves epoch 160 for branches
        assert set(diff_configs(c.cfg, twin.cfg)) == {"train.precision"} | extra, c.method
        assert (c.cfg.train.precision, twin.cfg.train.precision) == ("fp32", "auto")
    wd = load_grid("configs/grids/cifar10_lt_full_wd5e4.yaml", out="/nonexistent/wd")
    assert wd.ratios == [100] and wd.seeds == [0] and len(wd.cells) == 3
    for c in wd.cells:  # the main grid's cell, only the weight decay (both stages) and the precision pinned
        twin = next(t for t in full.cells if (t.method, t.ratio, t.seed) == (c.method[:-len("_wd5e4")], 100, 0))
        extra = {"train.save_epochs"} if c.method == "ce_wd5e4" else set()
        extra |= {"method.params.stage1"} if c.stage1 is not None else set()  # its own stage 1's last.pt
        assert set(diff_configs(c.cfg, twin.cfg)) == {"train.weight_decay", "train.precision"} | extra, c.method
        assert (c.cfg.train.weight_decay, twin.cfg.train.weight_decay) == (5e-4, 2e-4)
        assert c.cfg.train.precision == "bf16"
    assert wd.method("mislas_wd5e4").stage1 == "mislas_stage1_wd5e4"


def test_adopting_a_run_trained_outside_the_grid(tmp_path, capsys):
    path = write_grid(tmp_path, [{"name": "ce"}, {"name": "bs", "overrides": {"loss.name": "balanced_softmax"}}],
                      seeds=[0])
    grid = load_grid(path)
    cell = next(c for c in grid.cells if c.method == "ce")
    from longtail.runs import train_run

    train_run(cell.cfg, tmp_path / "runs/ce")
    (tmp_path / "runs/ce.log").write_text("exit 0 wall_seconds 40\nexit 0 wall_seconds 2\n")
    script = str(REPO / "benchmarks/adopt_cell.py")
    bad = subprocess.run([sys.executable, script, str(path), "bs", str(tmp_path / "runs/ce")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "was run with another config (loss.name)" in bad.stderr
    assert not (tmp_path / "out/bs").exists() and not any((tmp_path / "out").rglob("*.adopting"))
    ok = subprocess.run([sys.executable, script, str(path), "ce", str(tmp_path / "runs/ce")], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    info = json.loads((cell.dir / "bench.json").read_text())
    assert info["mode"] == "adopted" and info["wall_seconds"] == 42
    assert main(["bench", str(path), "--list"]) == 0
    assert "done    ce/ratio10/seed0" in capsys.readouterr().out


def test_keep_cells_carries_a_grid_to_a_fresh_machine(tmp_path, capsys):
    """benchmarks/keep_cells.py: the small files of every cell and only the checkpoints still needed;
    restored into an empty out, the grid sees the same states and runs on from them."""
    methods = [{"name": "ce"},
               {"name": "crt", "overrides": {"method.name": "crt", "sampler.name": "class_aware"}, "stage1": "ce"},
               {"name": "drw", "overrides": {"reweight.scheme": "effective_number", "reweight.start_epoch": 2},
                "branch_from": "ce", "branch_epoch": 1},
               {"name": "bs", "overrides": {"loss.name": "balanced_softmax"}}]
    path = write_grid(tmp_path, methods, seeds=[0], overrides={"train.epochs": 2})
    runs, kept = tmp_path / "out", tmp_path / "repo" / "kept"
    assert main(["bench", str(path), "--cell", "ce/ratio10/seed0,bs/ratio10/seed0", "--no-progress"]) == 0
    (runs / "bs" / "ratio10" / "seed0" / "eval.json").unlink()  # bs: cut off, to resume
    script = [sys.executable, str(REPO / "benchmarks/keep_cells.py"), str(path), "--from", str(runs), "--to", str(kept)]

    def checkpoints(method):
        return sorted(p.name for p in (kept / method / "ratio10" / "seed0").rglob("*.pt"))

    first = subprocess.run(script, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert checkpoints("ce") == ["epoch1.pt", "last.pt"]  # crt's stage 1, drw's branch point
    assert checkpoints("bs") == ["best_val.pt", "last.pt"]
    assert (kept / "ce" / "ratio10" / "seed0" / "metrics.jsonl").read_text() == \
        (runs / "ce" / "ratio10" / "seed0" / "metrics.jsonl").read_text()
    # a source cut off past its branch point keeps that checkpoint beside its resume files
    (runs / "ce" / "ratio10" / "seed0" / "eval.json").rename(tmp_path / "ce_eval.json")
    assert subprocess.run([*script[:-1], str(tmp_path / "kept2")], capture_output=True).returncode == 0
    assert sorted(p.name for p in (tmp_path / "kept2" / "ce").rglob("*.pt")) == ["best_val.pt", "epoch1.pt", "last.pt"]
    (tmp_path / "ce_eval.json").rename(runs / "ce" / "ratio10" / "seed0" / "eval.json")
    # on a fresh machine: restored, the grid finishes from the kept cells alone
    shutil.rmtree(runs)
    restored = subprocess.run([*script, "--restore"], capture_output=True, text=True)
    assert restored.returncode == 0 and "bs/ratio10/seed0: restored (resume)" in restored.stdout
    capsys.readouterr()
    assert main(["bench", str(path), "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["done", "new", "new", "resume"]
    assert main(["bench", str(path), "--no-progress"]) == 0
    again = subprocess.run([*script, "--last-of", "bs"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert checkpoints("ce") == [] and checkpoints("bs") == ["last.pt"] and checkpoints("drw") == []
    assert not list(kept.rglob(".*"))  # no staging folder left behind
    bad = subprocess.run([*script, "--last-of", "cee"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--last-of names no method of the grid: cee" in bad.stderr
