"""train.test_curve_from: the test split's top-1 after every epoch from a given epoch on, a
diagnostic of how far a paper's "best epoch on the test set" lies above the last epoch (issue
22). It must change no number of the run (a session key), select nothing, and its last value
must be the last epoch's test top-1 that eval.json reports."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import benchmark_script, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.rundir import RunDir
from longtail.runs import train_run


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, name="last") -> dict:
    return torch.load(run / f"checkpoints/{name}.pt", weights_only=False)["model"]


def test_the_curve_changes_no_number_and_ends_at_eval_json(tmp_path):
    base = {"train.epochs": 3, "data.val_per_class": 2}
    plain = train_run(config_from_dict(tiny_config(**base)), tmp_path / "plain", arrays=tiny_arrays())
    curve = train_run(config_from_dict(tiny_config(**base, **{"train.test_curve_from": 2})), tmp_path / "curve",
                      arrays=tiny_arrays())
    rows = _rows(tmp_path / "curve")
    assert ["test_curve_top1" in r for r in rows] == [False, True, True]
    assert {"test_curve_many", "test_curve_medium", "test_curve_few"} <= set(rows[-1])
    assert rows[-1]["test_curve_top1"] == curve["top1"] == plain["top1"]
    for name in ("last", "best_val"):  # bitwise the same training, the same best-on-validation pick
        a, b = _weights(tmp_path / "plain", name), _weights(tmp_path / "curve", name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if not k.startswith("test_curve_") and k not in ("seconds", "images_per_s")}
             for r in rows]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                     for r in _rows(tmp_path / "plain")]

    script = _gap_script()  # benchmarks/best_on_test_gap.py: best of the curve against the last epoch
    got = script.gap(str(tmp_path / "curve"))
    curve = [r["test_curve_top1"] for r in rows[1:]]
    assert got["curve_from"] == 2 and got["best_top1"] == max(curve) and got["last_top1"] == curve[-1]
    assert got["best_epoch"] == 2 + curve.index(max(curve)) and got["gap"] == max(curve) - curve[-1]
    assert script.main([str(tmp_path / "plain")]) == 2  # no curve: a one-line error


def _gap_script():
    return benchmark_script("best_on_test_gap")


def test_a_resumed_run_may_turn_it_on_for_its_session(tmp_path):
    cfg = tiny_config(**{"train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    more = tiny_config(**{"train.epochs": 2, "train.test_curve_from": 1})
    train_run(config_from_dict(more), tmp_path / "run", resume=True, arrays=tiny_arrays(), evaluate=False)
    assert ["test_curve_top1" in r for r in _rows(tmp_path / "run")] == [False, True]
    assert RunDir(tmp_path / "run").read_config().train.test_curve_from == 0  # config.yaml keeps its value


def test_a_negative_start_is_refused():
    with pytest.raises(ConfigError, match=r"config key 'train.test_curve_from' must be >= 0 \(0: off\), got -1"):
        config_from_dict(tiny_config(**{"train.test_curve_from": -1}))
