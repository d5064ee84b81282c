"""What the training studies share: budgets, one resumable training per point, result files.

A study is a list of points; each point is one ordinary run folder (`longtail.runs.train_run`)
under `OUT/runs/<point>/`. A point whose eval.json exists is read back, not retrained; a
point cut off mid-training resumes from its last checkpoint; a point folder that was trained
with a different config is an error (use another --out). After every point the study
rewrites OUT/results.json and OUT/results.csv (atomically), so a study stopped at any time
keeps every finished point and continues where it stopped when run again.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import config_from_dict, diff_configs
from ..dist import pin_precision
from ..errors import ConfigError
from ..report.figures import new_figure as figure, png_bytes  # noqa: F401  (re-exported for the studies)
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..log import warnings_only
from ..rundir import RunDir

DEFAULT_CIFAR10_ROOT = "../shared/data/cifar10-jpeg.tar.gz"
DATASETS = ("cifar10", "digits")


@dataclass(frozen=True)
class Budget:
    """Data source, model and optimiser of every training in a study."""

    data: str  # cifar10 | digits
    epochs: int
    width: int  # small_cnn width
    root: str | None = None  # cifar10: the CIFAR-10 (JPEG) ImageFolder archive or folder
    device: str = "cpu"

    def data_section(self) -> dict:
        if self.data == "cifar10":
            return {"source": "imagefolder", "root": self.root or DEFAULT_CIFAR10_ROOT}
        return {"source": "digits", "test_per_class": 50}

    def model_section(self) -> dict:
        return {"name": "small_cnn", "head": "linear", "params": {"width": self.width}}

    def train_section(self, seed: int) -> dict:
        common = {"epochs": self.epochs, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                  "lr_schedule": "cosine", "warmup_epochs": 1, "eval_batch_size": 500, "progress": False,
                  "seed": seed, "device": self.device}
        if self.data == "cifar10":
            return {**common, "batch_size": 128, "augment": {"crop_padding": 4, "flip": True}}
        return {**common, "batch_size": 32, "augment": {"crop_padding": 1, "flip": False}}


def check_budget(*, data: str, epochs: int, width: int) -> None:
    if data not in DATASETS:
        raise ConfigError(f"--data must be one of {', '.join(DATASETS)}, got '{data}'")
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if width < 1:
        raise ConfigError(f"--width must be >= 1, got {width}")


def parse_numbers(text: str, name: str, kind=float) -> list:
    """'0,0.1,0.2' -> [0.0, 0.1, 0.2]; a one-line ConfigError naming the option otherwise."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of {kind.__name__}s, got '{text}'") from None
    if not values:
        raise ConfigError(f"{name} is empty")
    return values


def run_point(cfg: dict, run_dir: Path, *, arrays: dict | None = None) -> dict:
    """Train one point into run_dir (or read its finished result back); returns its eval.json."""
    from ..runs import shared_precision, train_run

    run = RunDir(run_dir)
    config = config_from_dict(cfg)
    if run.is_run():
        saved = run.read_config()
        changed = diff_configs(pin_precision(config, like=saved), saved)  # paths: absolute, or relative to here
        if changed:
            raise ConfigError(f"study point {run.path} was run with another config ({', '.join(changed[:4])}); "
                              "use another --out")
        if run.has(RunDir.EVAL):
            return run.read_eval()
    elif config.train.precision == "auto" and run.path.parent.is_dir():
        # the precision of the study's other points, when they share one (runs.shared_precision)
        chosen = shared_precision(d for d in run.path.parent.iterdir() if d.is_dir())
        if chosen is not None:
            config = replace(config, train=replace(config.train, precision=chosen))
    with warnings_only():  # the study logs one line per point, not the point's epochs
        return train_run(config, run.path, resume=run.is_run(), arrays=arrays)


def write_results(out: Path, payload: dict, rows: list[dict]) -> None:
    """OUT/results.json (settings + points) and OUT/results.csv (one row per point), atomically."""
    atomic_write_json(out / "results.json", payload)
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "results.csv", buffer.getvalue())


def write_png(path: Path, png: bytes) -> None:
    atomic_write_bytes(path, png)


