"""The issue-24/25 methods under torchrun (2 CPU processes, gloo): each trains an epoch on tiny
digits (the stage-2 ones on a stage-1 run trained first) with the processes' weights bitwise
identical after it (the loop checks every epoch and stops with "the processes' weights diverged"
otherwise), as the other methods do (tests/test_distributed.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from test_distributed import ENV, TORCHRUN, run
from test_method_contract import SETUP

METHODS = ["bbn", "ride", "sade", "ncl", "remix", "cmo", "bcl", "paco", "gpaco", "proco", "kcl", "glmc"]
SINGLE_PROCESS = ["rsg"]  # refused under torchrun with one line (docs/methods.md); fslwf too (tests/test_fslwf.py)


def _nested(overrides: dict) -> dict:
    out: dict = {}
    for key, value in overrides.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _config(tmp_path, method: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = {"data": {"source": "digits", "imbalance_ratio": 2, "max_count": 40, "test_per_class": 10},
           "model": {"name": "small_cnn", "params": {"width": 8}},
           "method": {"name": method},
           "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "progress": False,
                     "num_threads": 1, "augment": {"crop_padding": 1}}}
    setup = SETUP.get(method, {})
    if "model.name" in setup:  # another network: its own parameters only
        cfg["model"] = {}
    _merge(cfg, _nested(setup))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_under_torchrun_with_identical_ranks(tmp_path, method):
    path = _config(tmp_path, method)
    run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longtail", "train", str(path),
         "--out", str(tmp_path / "ddp")], tmp_path / "seen")
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ranks_identical"]
    assert json.loads((tmp_path / "ddp" / "eval.json").read_text())["num_samples"] == 100


@pytest.mark.parametrize("method", SINGLE_PROCESS)
def test_single_process_methods_refuse_torchrun_in_one_line(tmp_path, method):
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longtail", "train",
                           str(_config(tmp_path, method)), "--out", str(tmp_path / "ddp")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"longtail: error: method '{method}' runs in one process only" in proc.stderr
    assert not (tmp_path / "ddp").exists()  # refused before a run folder exists


# stage-2 methods: (the method of their stage-1 run, what STAGE1 names in it)
STAGE2 = {"oltr": ("standard", "checkpoints/last.pt"), "lfme": ("standard", ""),
          "ride_router": ("ride", "checkpoints/last.pt")}


@pytest.mark.parametrize("method", sorted(STAGE2))
def test_stage2_method_trains_under_torchrun_with_identical_ranks(tmp_path, method):
    from longtail.cli import main

    stage1 = tmp_path / "stage1"
    first, inside = STAGE2[method]
    assert main(["train", str(_config(tmp_path / "s1", first)), "--out", str(stage1)]) == 0
    path = _config(tmp_path, method)
    path.write_text(path.read_text().replace("STAGE1", str(stage1 / inside).rstrip("/")))
    run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longtail", "train", str(path),
         "--out", str(tmp_path / "ddp")], tmp_path / "seen")
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["ranks_identical"] for r in rows)
