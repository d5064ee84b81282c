import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _eval_options() -> set[str]:
    from longtail.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in sub.choices["eval"]._actions for o in a.option_strings if o not in ("-h", "--help")}


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Two tiny digits runs: without and with a validation split (checkpoints/best_val.pt)."""
    runs = {}
    for name, val in (("plain", 0), ("val", 5)):
        base = tmp_path_factory.mktemp(f"eval_{name}")
        cfg = {"data": {"source": "digits", "imbalance_ratio": 10, "test_per_class": 20, "val_per_class": val},
               "model": {"name": "small_cnn", "params": {"width": 8}},
               "train": {"epochs": 3, "batch_size": 64, "warmup_epochs": 0, "progress": False}}
        (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(base / "cfg.yaml"), "--out", str(base / "run")]) == 0
        runs[name] = base / "run"
    return runs


def test_every_eval_option_is_tested_here():
    # a new option: add it to a test below (--no-aggregation: here and in tests/test_sade.py)
    assert _eval_options() == {"--logit-adjust-tau", "--test-agnostic", "--no-aggregation"}


@pytest.mark.parametrize("name", ["plain", "val"])
def test_eval_options(digits_runs, name, capsys):
    run = digits_runs[name]
    has_val = name == "val"
    assert (run / "checkpoints/best_val.pt").is_file() == has_val
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    ev = json.loads((run / "eval.json").read_text(), parse_constant=pytest.fail)
    assert out.splitlines()[0].startswith("last (epoch 3)") and f"wrote {run}/eval.json" in out
    assert ("best_val" in ev) == has_val and ("best-val (epoch" in out) == has_val
    for tau in ("1", "0"):
        assert main(["eval", str(run), "--logit-adjust-tau", tau]) == 0
        out = capsys.readouterr().out
        la = json.loads((run / "eval_logit_adjusted.json").read_text(), parse_constant=pytest.fail)
        lines = out.splitlines()
        assert lines[0].startswith("last (epoch 3)") and la["epoch"] == 3 and la["tau"] == float(tau)
        assert f"wrote {run}/eval_logit_adjusted.json" in out and f"tau {tau}: eval_logit_adjusted.json" in out
        assert ("best_val" in la) == has_val
        if has_val:
            assert la["best_val"]["epoch"] == ev["best_val"]["epoch"]
            assert lines[1].startswith(f"best-val (epoch {ev['best_val']['epoch']})")
        if tau == "0":  # no adjustment: the plain evaluation's numbers
            assert la["top1"] == ev["top1"] and la.get("best_val", {}).get("top1") == ev.get("best_val", {}).get("top1")
    assert json.loads((run / "eval.json").read_text()) == ev  # logit adjustment leaves eval.json alone
    for bad in ("-1", "nan"):
        assert main(["eval", str(run), "--logit-adjust-tau", bad]) == 2
        err = capsys.readouterr().err
        assert "tau must be a finite number >= 0" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["plain", "val"])
def test_eval_test_agnostic(digits_runs, name, tmp_path, capsys):
    """SADE's protocol on the stored logits: on the balanced digits test set, 'uniform' is the whole
    test set (eval.json's top-1), and with the prior known it is the tau-1 logit adjustment."""
    run = tmp_path / "run"
    shutil.copytree(digits_runs[name], run)
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run), "--logit-adjust-tau", "1"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    la = json.loads((run / "eval_logit_adjusted.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--test-agnostic"]) == 0
    out = capsys.readouterr().out
    ta = json.loads((run / "eval_test_agnostic.json").read_text(), parse_constant=pytest.fail)
    names = list(ta["distributions"])
    assert names[0] == "forward50" and names[5] == "uniform" and names[-1] == "backward50" and len(names) == 11
    uniform = ta["distributions"]["uniform"]
    assert uniform["num_samples"] == ev["num_samples"] and uniform["top1"] == pytest.approx(ev["top1"])
    assert uniform["prior_known"]["top1"] == pytest.approx(la["top1"])
    assert ("best_val" in ta) == (name == "val") and f"wrote {run}/eval_test_agnostic.json" in out
    if name == "val":
        assert ta["best_val"]["distributions"]["uniform"]["top1"] == pytest.approx(ev["best_val"]["top1"])
    forward = ta["distributions"]["forward50"]["test_counts"]
    head = int(np.argmax(json.loads((run / "data.json").read_text())["class_counts"]))
    assert forward[head] == 20 and min(forward) == 0  # int(20 / 50) = 0 images for the tail classes
    assert main(["eval", str(run), "--test-agnostic", "forward10,uniform", "--no-aggregation"]) == 0
    plain = json.loads((run / "eval_test_agnostic.json").read_text())  # no aggregation here: the same table
    assert main(["eval", str(run), "--test-agnostic", "forward10,uniform"]) == 0
    assert json.loads((run / "eval_test_agnostic.json").read_text()) == plain and "test_time_aggregation" not in plain
    assert list(plain["distributions"]) == ["forward10", "uniform"]
    before = (run / "eval_test_agnostic.json").read_bytes()
    capsys.readouterr()
    for bad, message in [("sideways10", "unknown test distribution 'sideways10'"),
                         ("forward0.5", "unknown test distribution 'forward0.5'"), (",", "no test distribution given")]:
        assert main(["eval", str(run), "--test-agnostic", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert (run / "eval_test_agnostic.json").read_bytes() == before  # a refused call writes nothing
    (run / "predictions.npz").unlink()
    assert main(["eval", str(run), "--test-agnostic"]) == 2
    assert "no predictions.npz" in capsys.readouterr().err


def test_eval_logit_adjustment_after_best_val_checkpoint_is_gone(digits_runs, tmp_path, capsys):
    """predictions.npz still holds best-val logits, best_val.pt is deleted: its epoch is unknown (null, '?')."""
    run = tmp_path / "run"
    shutil.copytree(digits_runs["val"], run)
    (run / "checkpoints/best_val.pt").unlink()
    capsys.readouterr()
    assert main(["eval", str(run), "--logit-adjust-tau", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("best-val (epoch ?)")
    assert json.loads((run / "eval_logit_adjusted.json").read_text())["best_val"]["epoch"] is None
    (run / "predictions.npz").unlink()
    assert main(["eval", str(run), "--logit-adjust-tau", "1"]) == 2
    assert "no predictions.npz" in capsys.readouterr().err


def test_label_out_of_range_through_the_cli(tmp_path, capsys):
    """An IDX test label that is not a training class: named with its file and index, not as a class without
    training images; exit 2, one line, no run folder."""
    import numpy as np

    def idx(array, code=0x08):
        return bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) \
            + array.astype(np.uint8).tobytes()

    root = tmp_path / "mnist"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(idx(np.zeros((30, 6, 6))))
    (root / "train-labels-idx1-ubyte").write_bytes(idx(np.arange(30) % 3))
    (root / "t10k-images-idx3-ubyte").write_bytes(idx(np.zeros((4, 6, 6))))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx(np.array([0, 1, 3, 2])))
    run = tmp_path / "run"
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "data.source=idx", f"data.root={root}", "data.profile=none",
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"longtail: error: label 3 out of range [0, 3) in {root}/t10k-labels-idx1-ubyte (index 2)\n"
    assert not run.exists()


def test_class_without_test_images_end_to_end(tmp_path, capsys, caplog):
    """train / eval / report / doctor on an image folder whose class 'c2' has training but no test images."""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(0)
    for split, counts in (("train", (12, 8, 6)), ("test", (3, 3, 0))):
        for c, n in enumerate(counts):
            folder = tmp_path / "ds" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rs.randint(0, 256, (6, 6, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path)), "data.source=imagefolder", f"data.root={tmp_path / 'ds'}",
                 "data.profile=none", f"data.cache_dir={tmp_path / 'cache'}", "eval.many_threshold=10",
                 "eval.few_threshold=7", "eval.rare_threshold=5", "--out", str(run)]) == 0
    assert any("class 'c2' has training images but no test images" in r.getMessage() for r in caplog.records)
    assert "few   -  " in capsys.readouterr().out  # the summary line, not 'nan'
    ev = json.loads((run / "eval.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert ev["groups"]["few"] == [2] and ev["few"] is None and ev["per_class"][2] is None
    assert ev["mean_per_class"] == pytest.approx((ev["per_class"][0] + ev["per_class"][1]) / 2)
    assert ev["warnings"] == ["class 'c2' has no test images: its accuracy is undefined (null) and it is left out "
                              "of mean_per_class and the shot-group means"]
    assert main(["eval", str(run), "--logit-adjust-tau", "1"]) == 0
    la = json.loads((run / "eval_logit_adjusted.json").read_text(), parse_constant=pytest.fail)
    assert la["few"] is None and la["warnings"] == ev["warnings"]
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    html = re.sub(r'src="data:[^"]*"', "", (tmp_path / "r.html").read_text())  # the text, not the figures
    assert "n/a" in html and not re.search(r"\bnan\b", html, re.IGNORECASE)
    assert "class &#x27;c2&#x27; has no test images" in html
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "ds"), "--out", str(tmp_path / "doc"), "--no-progress"]) == 0
    assert "note: class 'c2' has training images but no test images" in capsys.readouterr().out
    assert json.loads((tmp_path / "doc/doctor.json").read_text())["no_test_images"] == ["c2"]
