"""Training callbacks (longtail.callbacks): what a custom callback receives, that callbacks leave the
loop's numbers unchanged, one-line errors, and TensorBoard event files read back."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from conftest import tiny_arrays, tiny_config
from longtail.callbacks import Callback, CallbackContext, check_callbacks, tensorboard_available
from longtail.config import config_from_dict
from longtail.errors import ConfigError, LongtailError
from longtail.rundir import RunDir
from longtail.runs import train_run

NUMBERS = ("epoch", "lr", "train_loss", "train_top1", "val_top1", "val_many", "val_medium", "val_few")


class Recorder(Callback):
    """Records every call; draws from the global RNGs to show the loop is shielded from them."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, context):
        self.calls.append(("start", context))
        torch.rand(10), np.random.rand(10)

    def on_validation(self, epoch, metrics, arrays):
        self.calls.append(("validation", epoch, metrics, arrays))
        torch.randn(100)

    def on_epoch_end(self, epoch, row, context):
        self.calls.append(("epoch_end", epoch, row, context))
        torch.randn(100), np.random.rand(3)

    def on_train_end(self, context):
        self.calls.append(("end", context))


def _cfg(**over):
    return config_from_dict(tiny_config(**{"data.val_per_class": 2, "train.epochs": 2, **over}))


def _numbers(run):
    return [{k: r.get(k) for k in NUMBERS} for r in RunDir(run).read_metrics()]


def test_custom_callback_receives_the_stream_and_leaves_the_numbers(tmp_path):
    arrays = tiny_arrays()
    train_run(_cfg(), tmp_path / "plain", arrays=arrays, evaluate=False)
    rec = Recorder()
    train_run(_cfg(), tmp_path / "hooked", arrays=arrays, evaluate=False, callbacks=[rec])
    assert _numbers(tmp_path / "hooked") == _numbers(tmp_path / "plain")  # RNG draws inside callbacks change nothing
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start", "validation", "epoch_end", "validation", "epoch_end", "end"]
    start = rec.calls[0][1]
    assert isinstance(start, CallbackContext) and start.epochs == 2 and start.start_epoch == 0
    assert start.run_dir.path == tmp_path / "hooked" and len(start.class_names) == 4
    rows = RunDir(tmp_path / "hooked").read_metrics()
    ends = [c for c in rec.calls if c[0] == "epoch_end"]
    assert [c[1] for c in ends] == [1, 2] and [c[2] for c in ends] == rows
    vals = [c for c in rec.calls if c[0] == "validation"]
    assert [c[1] for c in vals] == [1, 2]
    _, epoch, metrics, arr = vals[-1]
    assert metrics["top1"] == rows[-1]["val_top1"] and len(metrics["per_class"]) == 4
    assert arr["logits"].shape == (8, 4) and arr["labels"].shape == (8,)


class Broken(Callback):
    def on_epoch_end(self, epoch, row, context):
        raise RuntimeError("logger offline\nsecond line")


def test_a_failing_callback_is_one_line_after_the_checkpoint(tmp_path):
    with pytest.raises(LongtailError) as err:
        train_run(_cfg(), tmp_path / "run", arrays=tiny_arrays(), callbacks=[Broken()])
    assert str(err.value) == "callback Broken.on_epoch_end failed at epoch 1: RuntimeError: logger offline"
    assert RunDir(tmp_path / "run").is_trained()  # the epoch's checkpoint came first: --resume continues


def test_config_callbacks_are_built_from_their_import_path(tmp_path, monkeypatch):
    module = types.ModuleType("lt_test_callbacks")
    made = []

    class Counting(Callback):
        def __init__(self):
            made.append(self)
            self.epochs = []

        def on_epoch_end(self, epoch, row, context):
            self.epochs.append(epoch)

    module.Counting = Counting
    monkeypatch.setitem(sys.modules, "lt_test_callbacks", module)
    train_run(_cfg(**{"train.callbacks": ["lt_test_callbacks:Counting"]}), tmp_path / "run", arrays=tiny_arrays(),
              evaluate=False)
    assert len(made) == 1 and made[0].epochs == [1, 2]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "each entry must be 'package.module:Name'"),
    ("lt_no_such_module_x:A", "cannot import 'lt_no_such_module_x'"),
    ("longtail.callbacks:Nope", "'longtail.callbacks' has no callable 'Nope'"),
])
def test_bad_callback_entries_fail_before_a_folder_exists(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        train_run(_cfg(**{"train.callbacks": [spec]}), tmp_path / "run", arrays=tiny_arrays())
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr("longtail.callbacks.tensorboard_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        train_run(_cfg(**{"train.tensorboard": True}), tmp_path / "run", arrays=tiny_arrays())
    assert str(err.value) == "train.tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed (pip install -e '.[test]')")
def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    arrays = tiny_arrays()
    train_run(_cfg(), tmp_path / "plain", arrays=arrays, evaluate=False)
    run = tmp_path / "tb"
    train_run(_cfg(**{"train.tensorboard": True}), run, arrays=arrays, evaluate=False)
    assert _numbers(run) == _numbers(tmp_path / "plain")
    acc = EventAccumulator(str(RunDir(run).tensorboard), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    rows = RunDir(run).read_metrics()
    assert rows[0]["val_many"] is None  # no class has > 100 training images: no many-shot scalar
    assert set(tags["scalars"]) == {"loss/train", "lr", "top1/train", "top1/val", "val/medium", "val/few",
                                    "speed/images_per_s"}
    loss = acc.Scalars("loss/train")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("top1/val")] == pytest.approx([r["val_top1"] for r in rows], rel=1e-6)
    assert set(tags["images"]) == {"val/confusion_matrix", "val/per_class_accuracy"}
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [1, 2]


def test_check_callbacks_accepts_the_defaults():
    check_callbacks(config_from_dict(tiny_config()))
