import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from longtail.cli import main


def write_config(tmp_path, **train):
    cfg = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 20},
           "model": {"name": "small_cnn", "params": {"width": 4}},
           "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "progress": False, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_counts(capsys):
    assert main(["data", "counts", "--dataset", "cifar10", "--imbalance-ratio", "100"]) == 0
    out = capsys.readouterr().out
    assert "total 12406" in out and "class 9  50" in out
    assert main(["data", "counts", "--dataset", "cifar100", "--imbalance-ratio", "50"]) == 0
    assert "total 12608" in capsys.readouterr().out
    assert main(["data", "counts", "--dataset", "cifar10", "--imbalance-ratio", "10", "--profile", "step"]) == 0
    assert "total 27500" in capsys.readouterr().out


def test_counts_bad_ratio(capsys):
    assert main(["data", "counts", "--dataset", "cifar10", "--imbalance-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: imbalance ratio must be a number >= 1") and err.count("\n") == 1


def test_train_eval_methods(tmp_path, capsys):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "train.lr=0.05", "--out", str(run)]) == 0
    assert "top1" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.05
    first = json.loads((run / "eval.json").read_text())
    (run / "eval.json").unlink()
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["top1"] == first["top1"]
    assert main(["train", "--resume", "--out", str(run)]) == 0  # already finished: evaluates again
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("standard", "ce", "class_balanced", "instance", "resnet32", "resnet50", "cosine"):
        assert name in out


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("train.epochs=two", "config key 'train.epochs' must be int, got str"),
    ("data.imbalance_ratio=0.5", "config key 'data.imbalance_ratio' must be a number >= 1"),
    ("method.name=decoupled", "unknown method 'decoupled'"),
    ("sampler.name=class_awar", "unknown sampler 'class_awar' (did you mean 'class_aware'?)"),
    ("data.source=imagefolder", "data.root is required"),
    ("loss.name=focal loss.params.gamma=-1", "loss 'focal': gamma must be a finite number >= 0, got -1"),
    ("sampler.name=class_aware sampler.params.samples_per_class=0", "sampler 'class_aware': "),
])
def test_bad_config_one_line_exit_2_nothing_written(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path)), *override.split(), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not run.exists()


def test_missing_data_path(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", str(write_config(tmp_path)), "data.source=imagefolder", f"data.root={tmp_path}/nowhere",
                 "--out", str(run)])
    assert code == 2 and "dataset path does not exist" in capsys.readouterr().err and not run.exists()


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "train", str(write_config(tmp_path)), "train.lrr=1", "--out", str(tmp_path / "r")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_eval_of_missing_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_installed_console_script():
    exe = Path(sys.executable).parent / "longtail"
    exe = str(exe) if exe.exists() else shutil.which("longtail")
    assert exe, "the longtail console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "data", "counts", "--dataset", "cifar100", "--imbalance-ratio", "100"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "total 10847" in proc.stdout
    proc = subprocess.run([exe, "validate", str(REPO / "configs/cifar10_lt/ce.yaml"), "train.nope=1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'train.nope'" in proc.stderr


def test_posthoc_logit_adjustment(tmp_path, capsys):
    import numpy as np

    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path)), "--out", str(run)]) == 0
    assert main(["eval", str(run), "--logit-adjust-tau", "1"]) == 0
    adjusted = json.loads((run / "eval_logit_adjusted.json").read_text())
    preds = np.load(run / "predictions.npz")
    counts = np.asarray(json.loads((run / "data.json").read_text())["class_counts"], dtype=np.float64)
    expected = (preds["logits"] - np.log(counts / counts.sum())).argmax(1)  # z_y - tau log pi_y, tau = 1
    assert adjusted["top1"] == pytest.approx((expected == preds["labels"]).mean() * 100)
    assert adjusted["tau"] == 1.0 and "eval_logit_adjusted.json" in capsys.readouterr().out
