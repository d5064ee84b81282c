"""`longtail bench --jobs N`: cells in concurrent processes, placed on cores or GPUs; results equal to
the sequential grid; a failing cell skips its dependants and leaves the others running; per-method
imbalance ratios and published numbers in the tables."""

from __future__ import annotations

import json

import pytest

from longtail.bench import load_grid
from longtail.bench.parallel import make_slots
from longtail.cli import main
from longtail.errors import ConfigError
from test_bench import write_grid

ONE_THREAD = ["train.num_threads=1"]  # the same arithmetic in-process and in a cell's process


def test_cpu_slots_split_the_cores_and_pin_each_job():
    slots = make_slots(2, gpus=[], cores=[0, 1, 2, 3], env={})
    assert [s.cores for s in slots] == [{0, 1}, {2, 3}]
    assert [s.env["OMP_NUM_THREADS"] for s in slots] == ["2", "2"]
    one = make_slots(1, gpus=[], cores=[0, 1], env={})
    assert one[0].cores == {0, 1} and one[0].env["OMP_NUM_THREADS"] == "2"
    many = make_slots(3, gpus=[], cores=[0, 1], env={})
    assert [s.cores for s in many] == [{0}, {1}, {0}] and {s.env["OMP_NUM_THREADS"] for s in many} == {"1"}


def test_gpu_slots_share_the_gpus_round_robin_and_keep_the_users_threads():
    slots = make_slots(5, gpus=["0", "3"], cores=list(range(16)), env={"OMP_NUM_THREADS": "4"})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "3", "0", "3", "0"]
    assert all(s.cores is None and s.env["OMP_NUM_THREADS"] == "4" for s in slots)
    assert make_slots(4, gpus=["0"], cores=list(range(16)), env={})[0].env["OMP_NUM_THREADS"] == "4"
    with pytest.raises(ValueError, match="--jobs"):
        make_slots(0, gpus=[], cores=[0], env={})


METHODS = [
    {"name": "ce"},
    {"name": "bs", "overrides": {"loss.name": "balanced_softmax"}},
    {"name": "crt", "overrides": {"method.name": "crt", "sampler.name": "class_aware"}, "stage1": "ce"},
]


def _top1(out, method, seed):
    return json.loads((out / method / "ratio10" / f"seed{seed}" / "eval.json").read_text())["top1"]


def test_jobs_give_the_sequential_grids_results(tmp_path):
    path = write_grid(tmp_path, METHODS)
    assert main(["bench", str(path), *ONE_THREAD, "--out", str(tmp_path / "seq"), "--no-progress"]) == 0
    assert main(["bench", str(path), *ONE_THREAD, "--out", str(tmp_path / "par"), "--jobs", "2",
                 "--no-progress"]) == 0
    for method in ("ce", "bs", "crt"):
        for seed in (0, 1):
            assert _top1(tmp_path / "par", method, seed) == _top1(tmp_path / "seq", method, seed)
    logs = sorted(p.name for p in (tmp_path / "par" / "logs").iterdir())
    assert logs == sorted(f"{m}_ratio10_seed{s}.log" for m in ("ce", "bs", "crt") for s in (0, 1))
    # a second call finds every cell done and starts no process
    assert main(["bench", str(path), *ONE_THREAD, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    assert (tmp_path / "par" / "results.md").is_file()


def test_a_failing_cell_skips_its_stage2_and_the_others_finish(tmp_path, capsys):
    methods = [{"name": "boom", "overrides": {"train.lr": 1.0e30}},
               {"name": "boom_crt", "overrides": {"method.name": "crt"}, "stage1": "boom"},
               {"name": "ce"}]
    path = write_grid(tmp_path, methods, seeds=[0])
    assert main(["bench", str(path), *ONE_THREAD, "--jobs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 3 cells did not finish: boom/ratio10/seed0, boom_crt/ratio10/seed0" in err
    out = tmp_path / "out"
    assert (out / "ce" / "ratio10" / "seed0" / "eval.json").is_file()
    assert not (out / "boom_crt" / "ratio10" / "seed0").exists()
    assert "non-finite loss" in (out / "logs" / "boom_ratio10_seed0.log").read_text()
    assert "pending" in (out / "results.md").read_text()


def test_a_single_cell_runs_alone_and_an_unknown_cell_is_named(tmp_path, capsys):
    path = write_grid(tmp_path, METHODS)
    assert main(["bench", str(path), "--cell", "ce/ratio10/seed1", "--no-progress"]) == 0
    out = tmp_path / "out"
    assert (out / "ce" / "ratio10" / "seed1" / "eval.json").is_file()
    assert not (out / "ce" / "ratio10" / "seed0").exists()
    assert main(["bench", str(path), "--cell", "ce/ratio10/seed7"]) == 2
    assert "'ce/ratio10/seed7' is not a cell of grid" in capsys.readouterr().err
    assert main(["bench", str(path), "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_chosen_cells_run_in_dependency_order_with_jobs_and_alone(tmp_path, capsys):
    path = write_grid(tmp_path, METHODS)
    out = tmp_path / "out"
    # the stage-2 cell named first still runs after its stage 1; bs and the other seeds stay untouched
    chosen = ["--cell", "crt/ratio10/seed0,ce/ratio10/seed0", "--cell", "ce/ratio10/seed1"]
    assert main(["bench", str(path), "--list", *chosen]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [["new", "ce/ratio10/seed0"], ["new", "crt/ratio10/seed0"],
                                                     ["new", "ce/ratio10/seed1"]]  # the grid's order
    assert main(["bench", str(path), *ONE_THREAD, *chosen, "--jobs", "2", "--no-progress"]) == 0
    done = sorted(str(p.parent.relative_to(out)) for p in out.glob("*/ratio10/seed*/eval.json"))
    assert done == ["ce/ratio10/seed0", "ce/ratio10/seed1", "crt/ratio10/seed0"]
    assert "crt" in (out / "results.md").read_text()
    # in this process (no --jobs): another cell; --methods with --cell is a one-line error
    assert main(["bench", str(path), *ONE_THREAD, "--cell", "bs/ratio10/seed1", "--no-progress"]) == 0
    assert (out / "bs" / "ratio10" / "seed1" / "eval.json").is_file() and not (out / "bs" / "ratio10" / "seed0").exists()
    assert main(["bench", str(path), "--cell", "ce/ratio10/seed0", "--methods", "ce"]) == 2
    assert "give --methods or --cell, not both" in capsys.readouterr().err


def test_methods_run_at_their_own_ratios_and_tables_show_published_numbers(tmp_path):
    methods = [{"name": "ce", "published": {10: 55.5}, "published_source": "Someone et al. 2020, Table 1"},
               {"name": "bs", "overrides": {"loss.name": "balanced_softmax"}, "imbalance_ratios": [10]}]
    path = write_grid(tmp_path, methods, seeds=[0], imbalance_ratios=[10, 5])
    grid = load_grid(path)
    assert [c.key for c in grid.cells] == ["ce/ratio10/seed0", "bs/ratio10/seed0", "ce/ratio5/seed0"]
    assert main(["bench", str(path), *ONE_THREAD, "--no-progress"]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ratio 10 top-1 | paper |" in md and "| 55.50 |" in md and "not run" in md
    assert "ce: Someone et al. 2020, Table 1" in md
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0].endswith(",published_top1") and any(r.startswith("last,ce,10,") and r.endswith(",55.5")
                                                        for r in rows)


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "imbalance_ratios": [3]}, "ratio 3 is not one of the grid's imbalance_ratios"),
    ({"name": "x", "imbalance_ratios": []}, "imbalance_ratios must be a non-empty list"),
    ({"name": "x", "published": {10: 55.0}}, "published numbers need published_source"),
    ({"name": "x", "published": {10: 555.0}, "published_source": "p"}, "published must map imbalance ratios"),
])
def test_bad_method_ratios_and_published_numbers_are_named(tmp_path, entry, message):
    path = write_grid(tmp_path, [entry], imbalance_ratios=[10, 5])
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_a_stage2_method_cannot_run_where_its_stage1_does_not(tmp_path):
    methods = [{"name": "ce", "imbalance_ratios": [10]},
               {"name": "crt", "overrides": {"method.name": "crt"}, "stage1": "ce"}]
    path = write_grid(tmp_path, methods, imbalance_ratios=[10, 5])
    with pytest.raises(ConfigError, match=r"'crt' runs at ratio 5, where 'ce' \(its stage 1\) does not run"):
        load_grid(path)


def test_weights_from_starts_a_cell_from_another_cells_last_checkpoint(tmp_path):
    """SSP fine-tuning in a grid: `weights_from: pre` sets model.weights to the same ratio and seed's
    `pre` cell's last.pt, and the cell waits for it (here both are plain CE on digits)."""
    methods = [{"name": "fine", "weights_from": "pre", "overrides": {"train.lr": 0.01}}, {"name": "pre"}]
    path = write_grid(tmp_path, methods, seeds=[0])
    grid = load_grid(path)
    fine = grid.cells_of("fine")[0]
    assert [c.key for c in grid.cells] == ["pre/ratio10/seed0", "fine/ratio10/seed0"]
    assert fine.needs.key == "pre/ratio10/seed0" and fine.need_kind == "pre-training"
    assert fine.cfg.model.weights == str(tmp_path / "out" / "pre" / "ratio10" / "seed0" / "checkpoints" / "last.pt")
    assert main(["bench", str(path), *ONE_THREAD, "--jobs", "2", "--no-progress"]) == 0
    assert "weights of pre" in (tmp_path / "out" / "results.md").read_text()
    bad = write_grid(tmp_path, [{"name": "a"}, {"name": "b", "weights_from": "a", "stage1": "a"}])
    with pytest.raises(ConfigError, match="weights_from cannot go with stage1"):
        load_grid(bad)
