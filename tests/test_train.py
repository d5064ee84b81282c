"""Tiny end-to-end CPU runs: loss values, resume == uninterrupted, run-folder contents, failures."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import ConfigError, DataError
from longtail.runs import evaluate_run, train_run
from longtail.io import safe_torch_load
from longtail.engine.loop import TrainingError
from longtail.optim.schedule import learning_rate


def test_ldam_schedule():
    lr = [learning_rate(e, base_lr=0.1, epochs=200, warmup_epochs=5, milestones=[160, 180]) for e in range(200)]
    assert lr[0] == pytest.approx(0.02) and lr[4] == pytest.approx(0.1) and lr[159] == pytest.approx(0.1)
    assert lr[160] == pytest.approx(1e-3) and lr[179] == pytest.approx(1e-3) and lr[180] == pytest.approx(1e-5)
    budget = [learning_rate(e, base_lr=0.1, epochs=30, warmup_epochs=1, milestones=[24, 27]) for e in range(30)]
    assert budget[23] == pytest.approx(0.1) and budget[24] == pytest.approx(1e-3) and budget[27] == pytest.approx(1e-5)
    cos = [learning_rate(e, base_lr=1.0, epochs=10, schedule="cosine") for e in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and all(a > b for a, b in zip(cos, cos[1:]))


def test_run_folder_contents(tmp_path):
    cfg = config_from_dict(tiny_config(**{"data.val_per_class": 2}))
    result = train_run(cfg, tmp_path / "run", arrays=tiny_arrays())
    run = tmp_path / "run"
    for name in ("config.yaml", "data.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best_val.pt",
                 "predictions.npz", "eval.json"):
        assert (run / name).is_file(), name
    ev = json.loads((run / "eval.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "mcc", "nmi", "ece", "confusion", "four_group"):
        assert key in ev
    assert ev == json.loads(json.dumps(result))
    assert ev["checkpoint"] == "last" and ev["best_val"]["selected_on"] == "validation top1"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "val_top1" in rows[0]  # epochs done, as eval.json's "epoch"
    preds = np.load(run / "predictions.npz")
    assert preds["logits"].shape == (24, 4) and preds["best_val_logits"].shape == (24, 4)
    assert (preds["logits"].argmax(1) == preds["labels"]).mean() * 100 == pytest.approx(ev["top1"])


def test_stored_loss_values(tmp_path):
    """Loss curve regression: a fixed tiny run gives the same per-epoch losses (CPU, 1 thread)."""
    cfg = config_from_dict(tiny_config(**{"train.channels_last": False}))
    train_run(cfg, tmp_path / "run", arrays=tiny_arrays())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [round(r["train_loss"], 4) for r in rows]
    assert losses == pytest.approx(STORED_LOSSES, abs=2e-3), losses


STORED_LOSSES = [1.0133, 0.7763]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.epochs": 3, "data.val_per_class": 2})
    _, _, cut = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    assert cut["epoch"] == 1  # interrupted right after the first checkpoint

    a = safe_torch_load(tmp_path / "full/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "cut/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_val_epoch"] == b["best_val_epoch"]

    def losses(run):
        return [json.loads(r)["train_loss"] for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("full") == losses("cut") and len(losses("cut")) == 3
    full_eval = json.loads((tmp_path / "full/eval.json").read_text())
    cut_eval = json.loads((tmp_path / "cut/eval.json").read_text())
    assert full_eval["per_class"] == cut_eval["per_class"] and full_eval["best_val"]["top1"] == cut_eval["best_val"]["top1"]


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = tiny_config()
    train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays())
    with pytest.raises(ConfigError, match="--resume cannot change train.lr of .*only train.epochs"):
        train_run(config_from_dict(tiny_config(**{"train.lr": 0.2})), tmp_path / "run", resume=True,
                  arrays=tiny_arrays())


def test_non_finite_loss_stops_with_location(tmp_path):
    cfg = config_from_dict(tiny_config(**{"train.lr": 1e30, "train.warmup_epochs": 0}))
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch \d+, step \d+; last finite loss"):
        train_run(cfg, tmp_path / "run", arrays=tiny_arrays())


def test_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown loss"):
        train_run(config_from_dict(tiny_config(**{"loss.name": "foca"})), out, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match="has no parameter"):
        train_run(config_from_dict(tiny_config(**{"loss.params": {"gamma": 2}})), out, arrays=tiny_arrays())
    with pytest.raises(DataError, match="dataset path does not exist"):
        train_run(config_from_dict({"data": {"source": "imagefolder", "root": str(tmp_path / "none")}}), out)
    assert not out.exists()


def test_existing_run_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        train_run(config_from_dict(tiny_config()), out, arrays=tiny_arrays())


def test_eval_rewrites_without_training(tmp_path):
    cfg = config_from_dict(tiny_config())
    first = train_run(cfg, tmp_path / "run", arrays=tiny_arrays())
    (tmp_path / "run" / "eval.json").unlink()
    again = evaluate_run(tmp_path / "run", arrays=tiny_arrays())
    assert again["top1"] == first["top1"] and again["confusion"] == first["confusion"]


def test_reading_the_loss_every_n_steps_changes_no_number(tmp_path):
    """train.loss_check_every=N reads the losses in one host sync per N steps (a GPU loop without a
    sync per step): the same parameters and the same logged losses as reading every step."""
    from longtail.io import safe_torch_load

    arrays = tiny_arrays()
    runs = {}
    for n in (1, 3, 100):
        runs[n] = tmp_path / f"every{n}"
        train_run(config_from_dict(tiny_config(**{"train.loss_check_every": n})), runs[n], arrays=arrays)
    first = safe_torch_load(runs[1] / "checkpoints/last.pt")
    metrics = (runs[1] / "metrics.jsonl").read_text().splitlines()
    for n in (3, 100):
        other = safe_torch_load(runs[n] / "checkpoints/last.pt")
        assert all(torch.equal(first["model"][k], other["model"][k]) for k in first["model"])
        for a, b in zip(metrics, (runs[n] / "metrics.jsonl").read_text().splitlines()):
            a, b = json.loads(a), json.loads(b)
            assert a["train_loss"] == b["train_loss"] and a["train_top1"] == b["train_top1"]


def test_non_finite_loss_names_the_first_bad_step_when_read_every_n(tmp_path):
    """Read every 4 steps, the stop names the same first bad step and last finite loss as read every step."""
    messages = []
    for every in (1, 4):
        cfg = config_from_dict(tiny_config(**{"train.lr": 1e30, "train.warmup_epochs": 0,
                                              "train.loss_check_every": every}))
        with pytest.raises(TrainingError) as err:
            train_run(cfg, tmp_path / f"every{every}", arrays=tiny_arrays())
        messages.append(str(err.value))
    assert re.search(r"non-finite loss \(\S+\) at epoch 1, step \d+; last finite loss \d", messages[0])
    assert messages[1] == messages[0]


def test_loss_check_every_is_validated_and_a_session_key():
    from longtail.config import SESSION_KEYS

    with pytest.raises(ConfigError, match="config key 'train.loss_check_every' must be >= 1, got 0"):
        config_from_dict(tiny_config(**{"train.loss_check_every": 0}))
    assert "train.loss_check_every" in SESSION_KEYS


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path, monkeypatch, caplog):
    """train.precision=bf16 still trains where the CPU emulates bf16, with one warning that names the
    CPU and the missing instruction sets; on a CPU with them (or in fp32) no warning."""
    import logging

    from longtail import dist

    cfg = config_from_dict(tiny_config(**{"train.epochs": 1, "train.precision": "bf16"}))
    for features, warned in (([], True), (["amx_bf16", "avx512_bf16"], False)):
        monkeypatch.setattr(dist, "cpu_bf16_features", lambda features=features: features)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="longtail.engine.loop"):
            train_run(cfg, tmp_path / f"run{len(features)}", arrays=tiny_arrays())
        hits = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
        assert len(hits) == int(warned)
        if warned:
            assert dist.cpu_model() in hits[0] and "AMX-BF16" in hits[0]


def test_cpu_bf16_features_reads_the_cpu_flags(monkeypatch, tmp_path):
    from pathlib import Path

    from longtail import dist

    info = tmp_path / "cpuinfo"
    real = Path.read_text

    def fake(self, *a, **k):
        return info.read_text() if str(self) == "/proc/cpuinfo" else real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake)
    info.write_text("model name\t: X\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert dist.cpu_bf16_features() == ["amx_bf16", "avx512_bf16"]
    info.write_text("model name\t: Y\nflags\t\t: fpu sse avx2 fma\n")
    assert dist.cpu_bf16_features() == []
