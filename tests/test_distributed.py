"""DDP with torchrun on CPU (gloo): 2 processes against 1, on a tiny dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from longtail.io import safe_torch_load
from longtail.rundir import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")

# Records, per rank and epoch, the training positions this process was given.
RECORDING_DRIVER = """
import os, sys, json
import numpy as np
from longtail.data import build as build_mod
real_batch = build_mod.Split.batch
seen = []
def batch(self, positions):
    if getattr(self, "is_train", False):
        seen.extend(int(p) for p in positions)
    return real_batch(self, positions)
build_mod.Split.batch = batch
real_build = build_mod.build_data
def build_data(*a, **k):
    data = real_build(*a, **k)
    data.train.is_train = True
    return data
import longtail.runs
longtail.runs.build_data = build_data
from longtail.cli import main
code = main(sys.argv[1:])
with open(os.environ["SEEN_FILE"] + "." + os.environ.get("RANK", "0"), "w") as fh:
    json.dump(seen, fh)
sys.exit(code)
"""


def write_config(path: Path, norm: str = "batch", **train) -> Path:
    cfg = {"data": {"source": "digits", "imbalance_ratio": 2, "max_count": 60, "test_per_class": 20},
           "model": {"name": "small_cnn", "params": {"width": 8, "norm": norm}},
           "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "progress": False,
                     "num_threads": 1, "precision": "fp32", **train}}  # fp32 on every CPU: exact comparisons
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd, seen_file):
    proc = subprocess.run(cmd, env={**ENV, "SEEN_FILE": str(seen_file)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def train_pair(root: Path, norm: str) -> Path:
    cfg = write_config(root / f"{norm}.yaml", norm=norm)
    run([sys.executable, "-c", RECORDING_DRIVER, "train", str(cfg), "--out", str(root / f"single_{norm}")],
        root / f"seen_single_{norm}")
    run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable, "-c", RECORDING_DRIVER,
         "train", str(cfg), "--out", str(root / f"ddp_{norm}")], root / f"seen_ddp_{norm}")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    train_pair(root, "batch")
    train_pair(root, "none")
    shutil.copytree(root / "ddp_batch", root / "ddp")
    return root


def test_ranks_stay_identical(runs):
    rows = [json.loads(r) for r in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["ranks_identical"] for r in rows)


def test_every_sample_once_per_epoch(runs):
    n_train = json.loads((runs / "ddp" / "data.json").read_text())["num_train"]
    ranks = [json.loads((runs / f"seen_ddp_batch.{r}").read_text()) for r in (0, 1)]
    assert abs(len(ranks[0]) - len(ranks[1])) <= 32  # equal steps, the last batch may differ by one image
    both = np.array(ranks[0] + ranks[1])
    assert len(both) == 2 * n_train  # two epochs
    # across the two ranks, each epoch visits every training position exactly once
    assert np.array_equal(np.sort(both), np.sort(np.concatenate([np.arange(n_train)] * 2)))


def _weights(path):
    return safe_torch_load(path / "checkpoints/last.pt")["model"]


def _losses(path):
    return [json.loads(r)["train_loss"] for r in (path / "metrics.jsonl").read_text().splitlines()]


def test_matches_single_process_exactly_without_batchnorm(runs):
    """Same images, crops, flips and global batch: only float summation order differs."""
    a, b = _weights(runs / "single_none"), _weights(runs / "ddp_none")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert np.allclose(_losses(runs / "single_none"), _losses(runs / "ddp_none"), rtol=1e-5)


def test_matches_single_process_within_tolerance_with_batchnorm(runs):
    """BatchNorm normalises each rank's half batch on its own (SyncBN needs CUDA): the
    stated tolerance is 1 % on the per-epoch training loss after 2 epochs."""
    assert np.allclose(_losses(runs / "single_batch"), _losses(runs / "ddp_batch"), rtol=1e-2)


def test_only_rank_zero_wrote(runs):
    names = sorted(p.name for p in (runs / "ddp").iterdir())
    assert names == ["checkpoints", "config.yaml", "data.json", "eval.json", "metrics.jsonl", "predictions.npz",
                     "sessions.jsonl"]
    sessions = RunDir(runs / "ddp").read_sessions()  # one session, written once, with both processes
    assert len(sessions) == 1 and sessions[0]["world_size"] == 2 and sessions[0]["start_epoch"] == 0


def test_resume_under_torchrun(runs, tmp_path):
    """Extend a finished 2-epoch run to 3 epochs: both ranks load the checkpoint and go on."""
    run_dir = tmp_path / "ddp"
    shutil.copytree(runs / "ddp", run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["epochs"] = 3
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longtail", "train", "--resume",
                "--out", str(run_dir)], tmp_path / "seen")
    assert "resuming" in proc.stdout and "top1" in proc.stdout
    # rank 0 alone logs (torchrun joins both ranks' stdout)
    assert proc.stdout.count(f"resuming {run_dir} after epoch 2/3") == 1 and proc.stdout.count("epoch 3/3: ") == 1
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["ranks_identical"]
    assert safe_torch_load(run_dir / "checkpoints/last.pt")["epoch"] == 3


@pytest.mark.parametrize("loss", ["ghm_c", "seesaw", "isda"])
def test_loss_statistics_are_reduced_over_ranks(tmp_path, loss):
    """GHM-C's bin counts and seesaw's cumulative class counts are summed over the ranks;
    ISDA's covariances are estimated from the gathered global batch (uneven last batch)."""
    cfg = yaml.safe_load(write_config(tmp_path / "c.yaml", norm="none").read_text())
    if loss == "isda":
        cfg["method"] = {"name": "isda"}
        cfg["data"]["max_count"] = 57  # 407 training images: the last global batch (23) splits 12 / 11
    else:
        cfg["loss"] = {"name": loss}
    cfg["train"]["epochs"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run([sys.executable, "-m", "longtail", "train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "single")],
        tmp_path / "s")
    run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "longtail", "train", str(tmp_path / "c.yaml"),
         "--out", str(tmp_path / "ddp")], tmp_path / "d")
    a = safe_torch_load(tmp_path / "single/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "ddp/checkpoints/last.pt")
    for k in a["loss"]:
        assert torch.allclose(a["loss"][k].double(), b["loss"][k].double(), rtol=1e-5, atol=1e-6), k
    for k in a["method"]:
        assert torch.allclose(a["method"][k].double(), b["method"][k].double(), rtol=1e-4, atol=1e-5), k
    if loss == "isda":
        assert b["method"]["count"].sum() == json.loads((tmp_path / "ddp/data.json").read_text())["num_train"]
    elif loss == "seesaw":
        counts = json.loads((tmp_path / "ddp/data.json").read_text())["class_counts"]
        assert b["loss"]["cum_samples"].tolist() == counts  # one epoch: every label counted once
    else:  # the global histogram makes the 2-process run equal to the 1-process one
        for k in a["model"]:
            assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k
