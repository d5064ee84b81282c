"""Branching a run off another run's checkpoint (engine/branch.py): the branched run must end
with the weights of the same config trained from scratch, and unsafe branches are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.runs import train_run
from longtail.io import safe_torch_load


BASE = {"train.epochs": 3, "train.milestones": [2], "data.val_per_class": 2}
CE = tiny_config(**BASE, **{"train.save_epochs": [1, 2]})
SWRM = tiny_config(**BASE, **{"loss": {"name": "swrm", "params": {"window": 3}},
                              "method": {"name": "swrm", "params": {"start_epoch": 2}}})
DYSWRM = tiny_config(**BASE, **{"loss": {"name": "swrm", "params": {"window": 3}},
                                "method": {"name": "dyswrm", "params": {"start_epoch": 2}}})
DRW = tiny_config(**BASE, **{"reweight": {"scheme": "effective_number", "beta": 0.999, "start_epoch": 2}})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A plain-CE run of 3 epochs that keeps its checkpoints after epochs 1 and 2."""
    root = tmp_path_factory.mktemp("branch_source")
    train_run(config_from_dict(CE), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce"


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_epochs_keeps_full_checkpoints(source):
    for e in (1, 2):
        ckpt = safe_torch_load(source / f"checkpoints/epoch{e}.pt")
        assert ckpt["epoch"] == e and "optimizer" in ckpt and "torch_rng" in ckpt
    assert not (source / "checkpoints/epoch3.pt").exists()


@pytest.mark.parametrize("cfg", [SWRM, DYSWRM, DRW], ids=["swrm", "dyswrm", "drw"])
def test_branch_equals_training_from_scratch(cfg, source, tmp_path):
    arrays = tiny_arrays()
    train_run(config_from_dict(cfg), tmp_path / "scratch", arrays=arrays, evaluate=False)
    train_run(config_from_dict(cfg), tmp_path / "branch", arrays=arrays, evaluate=False,
              branch_from=source / "checkpoints/epoch2.pt")
    a = safe_torch_load(tmp_path / "scratch/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "branch/checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert _same_state(a["model"], b["model"])  # bitwise, CPU, train.deterministic
    assert _same_state(a["loss"], b["loss"])
    assert a["method"].keys() == b["method"].keys()
    rows_a = [json.loads(r) for r in (tmp_path / "scratch/metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (tmp_path / "branch/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]
    assert (a["best_val_epoch"], a["best_val_top1"]) == (b["best_val_epoch"], b["best_val_top1"])
    record = json.loads((tmp_path / "branch/branch.json").read_text())
    assert record["epoch"] == 2 and record["from"].endswith("epoch2.pt")


def test_dyswrm_branch_moves_the_vector_and_keeps_model_momentum(source, tmp_path):
    train_run(config_from_dict(DYSWRM), tmp_path / "b", arrays=tiny_arrays(), evaluate=False,
              branch_from=source / "checkpoints/epoch2.pt")
    ckpt = safe_torch_load(tmp_path / "b/checkpoints/last.pt")
    init = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.1
    assert (ckpt["loss"]["vector"] - init).abs().max() > 1e-4
    state = ckpt["optimizer"]["state"]
    assert len(state) == len(ckpt["optimizer"]["param_groups"][0]["params"])  # model params and the vector


def test_a_branched_run_resumes(source, tmp_path, monkeypatch):
    arrays = tiny_arrays()
    train_run(config_from_dict(SWRM), tmp_path / "scratch", arrays=arrays, evaluate=False)
    from longtail.engine.loop import Trainer

    original_save = Trainer.save

    def save_then_stop(self, epoch):
        original_save(self, epoch)
        if epoch == 1:  # the branch point's own checkpoint (after 0-idx epoch 1 = epoch 2)
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_run(config_from_dict(SWRM), tmp_path / "b", arrays=arrays, evaluate=False,
                      branch_from=source / "checkpoints/epoch2.pt")
    assert safe_torch_load(tmp_path / "b/checkpoints/last.pt")["epoch"] == 2
    train_run(None, tmp_path / "b", resume=True, arrays=arrays, evaluate=False)
    a = safe_torch_load(tmp_path / "scratch/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "b/checkpoints/last.pt")
    assert _same_state(a["model"], b["model"])


@pytest.mark.parametrize("cfg, ckpt, match", [
    (SWRM, "epoch2.pt", None),  # control: allowed
    (tiny_config(**BASE, **{"loss": {"name": "focal", "params": {"gamma": 1.0}}}), "epoch1.pt",
     r"loss 'focal'\) trains as plain CE for its first 0 epochs"),
    (tiny_config(**BASE, **{"loss": {"name": "swrm", "params": {"window": 3}},
                            "method": {"name": "swrm", "params": {"start_epoch": 1}}}), "epoch2.pt",
     "at epoch 2: this config .* first 1 epoch only"),
    (tiny_config(**BASE, **{"train.lr": 0.01}), "epoch1.pt", "the configs differ in train.lr"),
    (tiny_config(**{**BASE, "train.epochs": 1}), "epoch2.pt", "after this run's train.epochs = 1"),
])
def test_unsafe_branches_are_refused_and_leave_nothing(cfg, ckpt, match, source, tmp_path):
    kwargs = dict(arrays=tiny_arrays(), evaluate=False, branch_from=source / "checkpoints" / ckpt)
    if match is None:
        train_run(config_from_dict(cfg), tmp_path / "ok", **kwargs)
        return
    with pytest.raises(ConfigError, match=match):
        train_run(config_from_dict(cfg), tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_a_different_length_is_refused_where_the_prefix_depends_on_it(tmp_path):
    arrays = tiny_arrays()
    cosine = tiny_config(**{**BASE, "train.lr_schedule": "cosine", "train.epochs": 1})
    train_run(config_from_dict(cosine), tmp_path / "short", arrays=arrays, evaluate=False)
    longer = tiny_config(**{**BASE, "train.lr_schedule": "cosine"})
    with pytest.raises(ConfigError, match=r"train.epochs differs \(1 there, 3 here\) and the cosine LR schedule"):
        train_run(config_from_dict(longer), tmp_path / "bad", arrays=arrays, evaluate=False,
                  branch_from=tmp_path / "short")
    assert not (tmp_path / "bad").exists()


def test_a_ce_source_past_its_own_drw_switch_is_refused(tmp_path):
    arrays = tiny_arrays()
    train_run(config_from_dict(DRW), tmp_path / "drw", arrays=arrays, evaluate=False)
    with pytest.raises(ConfigError, match="the source run .* first 2 epochs only"):
        train_run(config_from_dict(tiny_config(**BASE)), tmp_path / "bad", arrays=arrays, evaluate=False,
                  branch_from=tmp_path / "drw")


def test_bad_sources(source, tmp_path):
    cfg = config_from_dict(SWRM)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train_run(cfg, tmp_path / "a", arrays=tiny_arrays(), evaluate=False, branch_from=tmp_path / "none")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train_run(cfg, tmp_path / "b", arrays=tiny_arrays(), evaluate=False,
                  branch_from=source / "checkpoints/best_val.pt")
    with pytest.raises(ConfigError, match="--branch-from starts a new run"):
        train_run(cfg, source, resume=True, branch_from=source, arrays=tiny_arrays())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_save_epochs_is_validated():
    with pytest.raises(ConfigError, match=r"train.save_epochs' must be a list of epochs in \[1, train.epochs = 3\]"):
        config_from_dict(tiny_config(**{**BASE, "train.save_epochs": [4]}))


def test_cli_branch_from_a_missing_source(tmp_path):
    out = subprocess.run([sys.executable, "-m", "longtail", "train", "configs/cifar10_lt/swrm.yaml", "--out",
                          str(tmp_path / "x"), "--branch-from", str(tmp_path / "missing"), "--no-progress"],
                         capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode != 0
    assert "no checkpoint at" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()
