"""Feature extraction from a run folder: shapes, agreement with the run's logits, the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from longtail.cli import main
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.features import extract_features
from longtail.runs import train_run

from conftest import tiny_config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cfg = tiny_config(**{"data": {"source": "digits", "imbalance_ratio": 5, "test_per_class": 10, "val_per_class": 2},
                         "train.epochs": 1})
    run = tmp_path_factory.mktemp("feat") / "run"
    train_run(config_from_dict(cfg), run)
    return run


def test_features_of_every_split_match_the_runs_head(digits_run):
    fs = extract_features(digits_run)
    assert set(fs.splits) == {"train", "val", "test"}
    assert fs.num_classes == 10 and fs["train"]["features"].shape == (int(fs.class_counts.sum()), fs.dim)
    assert np.bincount(fs["val"]["labels"], minlength=10).tolist() == [2] * 10
    w, b = fs.head["weight"], fs.head["bias"]
    assert w.shape == (10, fs.dim)
    test = fs["test"]
    np.testing.assert_allclose(test["features"] @ w.T + b, test["logits"], rtol=1e-4, atol=1e-4)
    saved = np.load(digits_run / "predictions.npz")
    np.testing.assert_allclose(saved["logits"], test["logits"], rtol=1e-4, atol=1e-5)


def test_cache_is_reused_and_refreshed_when_the_checkpoint_changes(digits_run, caplog):
    first = extract_features(digits_run)
    caplog.clear()
    with caplog.at_level("INFO", logger="longtail"):
        again = extract_features(digits_run)
    assert caplog.messages == [] and np.array_equal(again["test"]["features"], first["test"]["features"])
    assert again.from_cache
    ckpt = digits_run / "checkpoints" / "last.pt"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level("INFO", logger="longtail"):
        fresh = extract_features(digits_run)  # extracted again: train, val, test
    assert not fresh.from_cache
    assert [m.split(" (")[0] for m in caplog.messages] == [f"features: {s}" for s in ("train", "val", "test")]


def test_bad_inputs_name_the_problem(digits_run, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="run folder not found"):
        extract_features(tmp_path / "nope")
    with pytest.raises(ConfigError, match="checkpoint must be one of last, best_val, got 'first'"):
        extract_features(digits_run, checkpoint="first")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"not a run folder \(no config.yaml\)"):
        extract_features(tmp_path / "empty")
    assert main(["features", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "features").exists()


def test_command_prints_shapes(digits_run, capsys):
    assert main(["features", str(digits_run)]) == 0
    out = capsys.readouterr().out
    assert "test  features (100, " in out and "cached in" in out


def test_cosine_head_weight_is_stored_classes_first(tmp_path):
    cfg = tiny_config(**{"data": {"source": "digits", "imbalance_ratio": 5, "test_per_class": 4},
                         "model.head": "cosine", "train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "run", evaluate=False)
    fs = extract_features(tmp_path / "run")
    assert fs.head["weight"].shape == (10, fs.dim) and "bias" not in fs.head
