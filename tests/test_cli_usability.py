"""What a daily user expects of the command line (issue "Usability II", items 1, 2 and 3).

1. Dotted overrides go anywhere on the line (`train CFG --out RUN loss.name=focal`), for every
   command that takes them; on `--resume` an override a resumed run cannot take is one line.
2. No progress-bar carriage returns where stderr is not a terminal: a redirected run writes one
   line per epoch (through a real subprocess with pipes), data preparation included.
3. `longtail validate` fails exactly where train fails before writing anything (unknown loss,
   unknown loss parameter, missing data root, missing weights / stage-1 / similarity run, missing
   split list), with train's one-line message and exit 2, without reading images.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from longtail.cli import build_parser, main, split_overrides
from test_cli import write_config


def saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# ------------------------------------------------------------------ 1. overrides anywhere


def test_overrides_after_the_options_and_between_them(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "loss.name=class_balanced", "train.lr=0.05"]) == 0
    assert (saved(tmp_path / "a")["loss"]["name"], saved(tmp_path / "a")["train"]["lr"]) == ("class_balanced", 0.05)
    assert main(["train", "--out", str(tmp_path / "b"), str(cfg), "train.lr=0.02", "--no-progress",
                 "loss.name=focal", "train.lr=0.03"]) == 0  # in order: the later one wins
    assert (saved(tmp_path / "b")["loss"]["name"], saved(tmp_path / "b")["train"]["lr"]) == ("focal", 0.03)
    capsys.readouterr()
    assert main(["--debug", "validate", str(cfg), "train.epochs=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 3


def test_split_overrides_leaves_option_values_and_other_commands_alone():
    parser = build_parser()
    argv = ["doctor", "spec", "--out", "a.b=c", "data.imbalance_ratio=5", "--top", "3", "--", "x.y=1"]
    assert split_overrides(parser, argv) == (["doctor", "spec", "--out", "a.b=c", "--top", "3", "--", "x.y=1"],
                                             ["data.imbalance_ratio=5"])
    assert split_overrides(parser, ["bench", "g.yaml", "--out=o", "train.epochs=2"]) == \
        (["bench", "g.yaml", "--out=o"], ["train.epochs=2"])
    assert split_overrides(parser, ["report", "r", "--title", "a.b=c"]) == (["report", "r", "--title", "a.b=c"], [])
    assert split_overrides(parser, ["eval", "run", "a.b=1"]) == (["eval", "run", "a.b=1"], [])  # takes none
    assert split_overrides(parser, ["train", "c.yaml", "lr=1"]) == (["train", "c.yaml", "lr=1"], [])  # not dotted


def test_resume_with_an_override_a_resumed_run_cannot_take_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path)), "--out", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "loss.name=focal", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--resume cannot change loss.name, train.lr of {run}" in err and "only train.epochs" in err
    assert (run / "config.yaml").read_text() == before


# ------------------------------------------------------------------ 2. no bars in files and pipes


def write_imagefolder(root: Path, counts=(12, 8, 6), test=3) -> Path:
    rs = np.random.RandomState(0)
    for split, per_class in (("train", counts), ("test", (test,) * len(counts))):
        for c, n in enumerate(per_class):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(60 * c + rs.randint(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_a_redirected_run_writes_one_line_per_epoch_and_no_carriage_return(tmp_path):
    data = write_imagefolder(tmp_path / "images")
    cfg = {"data": {"source": "imagefolder", "root": str(data), "imbalance_ratio": 2},
           "model": {"name": "small_cnn", "params": {"width": 4}},
           "train": {"epochs": 3, "batch_size": 4, "warmup_epochs": 0, "num_threads": 1}}  # progress: default on
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "longtail", "train", str(path), "--out", str(tmp_path / "run")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert "\r" not in both  # neither the decoding bar nor the training bar
    assert len(re.findall(r"^epoch \d/3: ", proc.stdout, re.M)) == 3
    assert proc.stderr == ""


def test_bar_enabled_only_on_a_terminal(monkeypatch):
    from longtail.log import bar_enabled

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert bar_enabled(True) and not bar_enabled(False)
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert not bar_enabled(True)


# ------------------------------------------------------------------ 3. validate checks what train checks


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A trained 1-epoch digits run (small_cnn width 4): a stage-1 checkpoint and a similarity run."""
    root = tmp_path_factory.mktemp("stage1")
    assert main(["train", str(write_config(root)), "--out", str(root / "run")]) == 0
    return root / "run"


CASES = [  # (overrides, train's message)
    (["loss.name=clas_balanced"], "unknown loss 'clas_balanced' (did you mean 'class_balanced'?)"),
    (["loss.name=class_balanced", "loss.params.betta=0.9"], "loss 'class_balanced' has no parameter 'betta'"),
    (["data.source=imagefolder", "data.root={tmp}/nowhere"], "dataset path does not exist: {tmp}/nowhere"),
    (["data.source=cifar10", "data.root={tmp}/nowhere"], "dataset path does not exist: {tmp}/nowhere"),
    (["data.source=split_list", "data.root={tmp}", "data.train_list={tmp}/train.txt"],
     "split list not found: {tmp}/train.txt"),
    (["model.weights={tmp}/none.pt"], "checkpoint not found: {tmp}/none.pt"),
    (["method.name=crt", "method.params.stage1={tmp}/none.pt"], "checkpoint not found: {tmp}/none.pt"),
    (["method.name=swrm", "loss.name=swrm", "method.params.start_epoch=0", "method.params.similarity_run={tmp}"],
     "method.params.similarity_run must be a trained run folder"),
    (["sampler.name=class_aware", "sampler.params.samples_per_class=0"], "sampler 'class_aware': "),
    (["optimizer.name=adamw", "optimizer.params.eps=-1"], "optimizer 'adamw': eps must be > 0"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[1].split(":")[0][:40] for c in CASES])
def test_validate_fails_where_train_fails_with_the_same_line(tmp_path, capsys, overrides, message):
    cfg = write_config(tmp_path)
    over = [o.format(tmp=tmp_path) for o in overrides]
    message = message.format(tmp=tmp_path)
    assert main(["validate", str(cfg), *over]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["train", str(cfg), *over, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_config_that_validates_trains(tmp_path, capsys, stage1):
    cfg = write_config(tmp_path)
    for over in ([], [f"model.weights={stage1}/checkpoints/last.pt"],
                 ["method.name=crt", f"method.params.stage1={stage1}/checkpoints/last.pt"],
                 ["method.name=swrm", "loss.name=swrm", "method.params.start_epoch=0",
                  f"method.params.similarity_run={stage1}"]):
        assert main(["validate", str(cfg), *over]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.splitlines()[-1].startswith("# checked: data digits (10 classes, 1 channel)")
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["train", str(cfg), *over, "--out", str(run)]) == 0


def test_validate_reads_no_image(tmp_path, capsys, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("validate decoded an image")

    monkeypatch.setattr("longtail.data.sources.decode_many", no_decoding)
    data = write_imagefolder(tmp_path / "images")
    cfg = write_config(tmp_path)
    assert main(["validate", str(cfg), "data.source=imagefolder", f"data.root={data}", "data.imbalance_ratio=2",
                 "loss.name=ldam"]) == 0
    assert "# checked: data imagefolder (3 classes, 3 channels)" in capsys.readouterr().out
    (data / "train" / "c9").mkdir()  # an empty class folder: the same check as loading
    assert main(["validate", str(cfg), "data.source=imagefolder", f"data.root={data}"]) == 2
    assert f"class 'c9' has no images in {data / 'train' / 'c9'}" in capsys.readouterr().err
