"""benchmarks/bn_recalibration.py (issue 22, a diagnostic): BatchNorm statistics re-estimated on
the training images, against hand-computed statistics, and the untouched checkpoint's row
against the run's own eval.json."""

from __future__ import annotations

import numpy as np
import torch

from conftest import benchmark_script, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.augment import BatchAugment
from longtail.data.build import build_data
from longtail.rundir import RunDir
from longtail.runs import train_run


def _script():
    return benchmark_script("bn_recalibration")


def test_one_batch_gives_the_batch_mean_and_unbiased_variance():
    cfg = config_from_dict(tiny_config(**{"train.batch_size": 10_000}))  # the whole split in one batch
    data = build_data(cfg.data, arrays=tiny_arrays())
    norm = torch.nn.BatchNorm2d(3, momentum=0.3)
    model = torch.nn.Sequential(norm)
    assert _script().recalibrate(model, data, cfg, augment=False) == 1
    x = BatchAugment(mean=data.mean, std=data.std)(torch.from_numpy(data.train.batch(np.arange(len(data.train)))))
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double()
    assert torch.allclose(norm.running_mean.double(), flat.mean(1), atol=1e-5)
    assert torch.allclose(norm.running_var.double(), flat.var(1, unbiased=True), atol=1e-4)
    assert norm.momentum == 0.3 and not model.training  # restored: its momentum, eval mode


def test_batches_mix_the_classes_of_a_split_stored_class_by_class():
    # tiny_arrays sets the brightness by class: the variance is mostly between the classes, and a
    # pass in the stored order (batches of one class) would estimate the within-class part only
    cfg = config_from_dict(tiny_config(**{"train.batch_size": 8}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    labels = np.asarray(data.train.labels)
    assert (np.diff(labels) >= 0).all()  # the premise: stored class by class
    norm = torch.nn.BatchNorm2d(3)
    _script().recalibrate(torch.nn.Sequential(norm), data, cfg, augment=False)
    x = BatchAugment(mean=data.mean, std=data.std)(torch.from_numpy(data.train.batch(np.arange(len(labels)))))
    total = x.permute(1, 0, 2, 3).reshape(3, -1).double().var(1)
    within = torch.stack([x[labels == c].permute(1, 0, 2, 3).reshape(3, -1).double().var(1)
                          for c in np.unique(labels)]).mean(0)
    assert (total > 5 * within).all()
    assert torch.allclose(norm.running_var.double(), total, rtol=0.35)


def test_the_saved_row_is_eval_json_and_every_row_reads_the_same_checkpoint(tmp_path):
    cfg = tiny_config(**{"train.epochs": 2})
    train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays())
    script = _script()
    rows = script.rows_of(str(tmp_path / "run"), arrays=tiny_arrays())
    assert [r["stats"] for r in rows] == ["as saved", "aug", "plain"]
    assert rows[0]["top1"] == RunDir(tmp_path / "run").read_eval()["top1"]
    assert all(r["epoch"] == 2 for r in rows)
    assert script.main([str(tmp_path / "missing")]) == 2  # a one-line error, no table
