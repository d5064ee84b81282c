"""train.precision: auto (issue 21, item 3): bf16 on a CPU with native bf16, fp32 elsewhere,
resolved once when a run starts and recorded in its config.yaml, so the run keeps its
precision when it is resumed, branched or re-checked on another machine. The CPU's
instruction sets are monkeypatched (dist.cpu_bf16_features), so every test runs the same on
any machine."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from conftest import tiny_arrays, tiny_config
from longtail import dist
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.engine.loop import Trainer
from longtail.errors import ConfigError
from longtail.rundir import RunDir
from longtail.runs import train_run

NATIVE, EMULATED = ["amx_bf16", "avx512_bf16"], []


def _cpu(monkeypatch, features):
    monkeypatch.setattr(dist, "cpu_bf16_features", lambda: list(features))


def _saved_precision(run) -> str:
    return RunDir(run).read_config().train.precision


def test_auto_resolves_by_device_and_cpu(monkeypatch):
    _cpu(monkeypatch, NATIVE)
    assert dist.resolve_precision("auto", "cpu") == "bf16"
    assert dist.resolve_precision("auto", torch.device("cuda", 0)) == "fp32"  # no CUDA needed: a device object
    assert dist.resolve_precision("fp32", "cpu") == "fp32" and dist.resolve_precision("bf16", "cpu") == "bf16"
    train = config_from_dict(tiny_config(**{"train.precision": "auto"})).train
    assert dist.autocast_dtype(train) is torch.bfloat16
    _cpu(monkeypatch, EMULATED)
    assert dist.resolve_precision("auto", "cpu") == "fp32" and dist.autocast_dtype(train) is None
    assert dist.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept (and warned about)


def test_pin_precision_prefers_the_run_it_continues(monkeypatch):
    _cpu(monkeypatch, NATIVE)
    auto = config_from_dict(tiny_config(**{"train.precision": "auto"}))
    fp32 = config_from_dict(tiny_config())
    assert dist.pin_precision(auto).train.precision == "bf16"
    assert dist.pin_precision(auto, like=fp32).train.precision == "fp32"
    assert dist.pin_precision(fp32, like=dist.pin_precision(auto)) is fp32  # concrete values are never changed
    assert auto.train.precision == "auto"  # a copy, the caller's config untouched


def test_the_trainer_autocasts_where_auto_means_bf16(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_config(**{"train.precision": "auto"}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    for features, dtype in ((NATIVE, torch.bfloat16), (EMULATED, None)):
        _cpu(monkeypatch, features)
        assert Trainer(cfg, data, tmp_path / f"t{len(features)}").forward.autocast_dtype is dtype


def test_a_new_run_records_the_choice_and_a_resume_elsewhere_keeps_it(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(**{"train.precision": "auto", "train.epochs": 1})
    _cpu(monkeypatch, NATIVE)
    with caplog.at_level(logging.INFO, logger="longtail.runs"):
        train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.precision auto")]
    assert len(said) == 1 and said[0].startswith("train.precision auto: bf16 (amx_bf16, avx512_bf16 on ")
    assert _saved_precision(tmp_path / "run") == "bf16"
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["train"]["precision"] == "bf16"

    # the same 'auto' config, resumed (one more epoch) on a CPU that emulates bf16: the run goes on in bf16
    _cpu(monkeypatch, EMULATED)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longtail.engine.loop"):
        train_run(config_from_dict({**cfg, "train": {**cfg["train"], "epochs": 2}}), tmp_path / "run",
                  resume=True, arrays=tiny_arrays(), evaluate=False)
    assert _saved_precision(tmp_path / "run") == "bf16"
    assert RunDir(tmp_path / "run").checkpoint_epoch("last") == 2
    assert any("no native bf16" in r.getMessage() for r in caplog.records)  # the bf16 run says it is emulated now

    # an explicit other precision is still a change a resume refuses
    with pytest.raises(ConfigError, match=r"--resume cannot change train.precision of "):
        train_run(config_from_dict({**cfg, "train": {**cfg["train"], "precision": "fp32"}}), tmp_path / "run",
                  resume=True, arrays=tiny_arrays(), evaluate=False)


def test_a_new_run_on_a_cpu_without_native_bf16_is_fp32(tmp_path, monkeypatch):
    _cpu(monkeypatch, EMULATED)
    train_run(config_from_dict(tiny_config(**{"train.precision": "auto", "train.epochs": 1})), tmp_path / "run",
              arrays=tiny_arrays(), evaluate=False)
    assert _saved_precision(tmp_path / "run") == "fp32"


def test_a_branch_takes_its_sources_precision(tmp_path, monkeypatch):
    """A DRW run branched off an fp32 CE prefix on a machine where auto means bf16: the branch
    continues in fp32 (what training it from scratch in the source's precision gives), where
    pinning this machine's bf16 would make check_branch refuse the differing precision."""
    base = {"train.epochs": 2, "train.milestones": [1], "train.save_epochs": [1]}
    train_run(config_from_dict(tiny_config(**base)), tmp_path / "ce", arrays=tiny_arrays(), evaluate=False)
    _cpu(monkeypatch, NATIVE)
    drw = tiny_config(**base, **{"train.precision": "auto",
                                 "reweight": {"scheme": "effective_number", "beta": 0.999, "start_epoch": 1}})
    train_run(config_from_dict(drw), tmp_path / "drw", arrays=tiny_arrays(), evaluate=False,
              branch_from=tmp_path / "ce/checkpoints/epoch1.pt")
    assert _saved_precision(tmp_path / "drw") == "fp32"


def test_a_grid_cell_with_auto_is_rechecked_against_its_saved_choice(tmp_path, monkeypatch, capsys):
    from test_bench import write_grid

    path = write_grid(tmp_path, [{"name": "ce"}], seeds=[0], overrides={"train.precision": "auto"})
    _cpu(monkeypatch, NATIVE)
    assert main(["bench", str(path), "--no-progress"]) == 0
    assert _saved_precision(tmp_path / "out/ce/ratio10/seed0") == "bf16"
    _cpu(monkeypatch, EMULATED)  # the grid again, elsewhere: the finished cell is its own, not another config
    capsys.readouterr()
    assert main(["bench", str(path), "--no-progress"]) == 0
    assert "done, skipped" in capsys.readouterr().out


def test_the_default_is_auto_and_a_run_saved_before_the_key_resumes_in_fp32(tmp_path, monkeypatch):
    """train.precision defaults to auto since the precision study (benchmarks/RESULTS.md); a run
    whose config.yaml predates the key trained in fp32 and must not become bf16 when resumed on a
    CPU with native bf16 (rundir.TRAINED_WITHOUT_KEY)."""
    assert config_from_dict({}).train.precision == "auto"
    cfg = tiny_config(**{"train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    path = tmp_path / "run/config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["train"]["precision"]  # as a run written before train.precision existed
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    _cpu(monkeypatch, NATIVE)
    assert _saved_precision(tmp_path / "run") == "fp32"
    train_run(None, tmp_path / "run", resume=True, arrays=tiny_arrays(), evaluate=False)
    assert RunDir(tmp_path / "run").checkpoint_epoch("last") == 1  # nothing to add, and no refusal
    more = {**cfg, "train": {**cfg["train"], "epochs": 2}}
    del more["train"]["precision"]  # the user's config, silent on precision (so auto): continues in fp32
    train_run(config_from_dict(more), tmp_path / "run", resume=True, arrays=tiny_arrays(), evaluate=False)
    assert _saved_precision(tmp_path / "run") == "fp32" and RunDir(tmp_path / "run").checkpoint_epoch("last") == 2


def test_a_grid_begun_in_fp32_finishes_in_fp32_on_a_cpu_with_native_bf16(tmp_path, monkeypatch, caplog):
    """A new cell whose config says auto takes the precision of the grid's existing cells
    (bench.runner.grid_precision): one table, one precision, wherever it is finished."""
    from test_bench import write_grid

    path = write_grid(tmp_path, [{"name": "ce"}], overrides={"train.precision": "auto"})  # seeds 0 and 1
    _cpu(monkeypatch, EMULATED)
    assert main(["bench", str(path), "--cell", "ce/ratio10/seed0", "--no-progress"]) == 0
    assert _saved_precision(tmp_path / "out/ce/ratio10/seed0") == "fp32"
    _cpu(monkeypatch, NATIVE)
    with caplog.at_level(logging.INFO, logger="longtail.bench.runner"):
        assert main(["bench", str(path), "--no-progress"]) == 0
    assert _saved_precision(tmp_path / "out/ce/ratio10/seed1") == "fp32"
    assert any(r.getMessage().endswith("train.precision auto: fp32, the precision of the grid's other cells")
               for r in caplog.records)


def test_a_study_begun_in_fp32_finishes_in_fp32(tmp_path, monkeypatch):
    """Study points (studies._points.run_point) follow their siblings' precision as grid cells do."""
    from longtail.studies._points import run_point

    cfg = tiny_config(**{"train.precision": "auto", "train.epochs": 1})
    _cpu(monkeypatch, EMULATED)
    run_point(cfg, tmp_path / "runs/a", arrays=tiny_arrays())
    _cpu(monkeypatch, NATIVE)
    run_point({**cfg, "train": {**cfg["train"], "seed": 1}}, tmp_path / "runs/b", arrays=tiny_arrays())
    assert _saved_precision(tmp_path / "runs/a") == _saved_precision(tmp_path / "runs/b") == "fp32"
    run_point(cfg, tmp_path / "fresh/a", arrays=tiny_arrays())  # a study with no point yet: this machine's choice
    assert _saved_precision(tmp_path / "fresh/a") == "bf16"
