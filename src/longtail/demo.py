"""`longtail demo`: long-tailed digits, CE against a re-balancing loss, side by side.

scikit-learn's bundled 8x8 digits (no download): a balanced test set of 50 images per
class is held out, the rest is subsampled to an exponential profile with imbalance ratio
10 (head class 0: 128 images, tail class 9: 12), and a small CNN is trained twice, with
plain cross-entropy and with the class-balanced loss (effective number, beta 0.999).
It ends by writing the HTML report of both runs (`longtail report`) to out/report.html
and printing its path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import config_from_dict
from .errors import ConfigError
from .eval.metrics import format_summary
from .log import warnings_only
from .report import build_report
from .rundir import RunDir
from .runs import train_run

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

DEMO_RUNS = {
    "ce": {"name": "ce", "params": {}},
    "class_balanced": {"name": "class_balanced", "params": {"beta": 0.999}},
}


def demo_config(loss: dict, *, epochs: int = 30, progress: bool = True) -> dict:
    return {
        "data": {"source": "digits", "profile": "exp", "imbalance_ratio": 10, "test_per_class": 50, "seed": 0},
        "model": {"name": "small_cnn", "head": "linear"},
        "loss": loss,
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "weight_decay": 5e-4, "lr_schedule": "cosine",
                  "warmup_epochs": 1, "eval_batch_size": 500, "progress": progress, "seed": 0,
                  "augment": {"crop_padding": 1, "flip": False}},
    }


def run_demo(out: str | Path = "longtail-demo", *, epochs: int = 30, progress: bool = True) -> dict:
    """Train both demo runs into out/<loss>/, log the comparison (INFO lines, without the runs'
    own epoch lines) and write their HTML report to out/report.html; returns their eval dicts."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    out = Path(out)
    for name in DEMO_RUNS:
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; remove it or pass --out to another folder")
    if (out / REPORT_NAME).is_dir():  # checked before training: the report is written last
        raise ConfigError(f"{out / REPORT_NAME} is a folder; remove it or pass --out to another folder")
    results = {}
    for name, loss in DEMO_RUNS.items():
        log.info(f"== {name}: training {out / name}")
        cfg = config_from_dict(demo_config(loss, epochs=epochs, progress=progress))
        with warnings_only():
            results[name] = train_run(cfg, out / name)
    first = next(iter(results.values()))
    counts, names = first["train_counts"], first["class_names"]
    log.info("")
    log.info(f"long-tailed digits: {sum(counts)} training images, counts {counts[0]}..{counts[-1]} "
             f"(ratio {counts[0] / counts[-1]:.1f}), balanced test {first['num_samples']} images")
    for name, res in results.items():
        log.info(format_summary(name, res))
    log.info("")
    header = f"{'class':>5} {'train n':>7} {'group':>6} " + " ".join(f"{n:>14}" for n in results)
    log.info(header)
    for c, n in enumerate(counts):
        group = next(g for g, idx in first["groups"].items() if c in idx)
        accs = " ".join(f"{res['per_class'][c]:>14.1f}" for res in results.values())
        log.info(f"{names[c]:>5} {n:>7} {group:>6} {accs}")
    log.info(f"\nrun folders: {', '.join(str(out / n) for n in results)} "
             f"({RunDir.EVAL}, {RunDir.METRICS}, {RunDir.CHECKPOINTS}/)")
    report = build_report([out / n for n in results], out / REPORT_NAME, title="longtail demo: long-tailed digits")
    log.info(f"report: {report['out']} (open it in a browser: per-class accuracy, confusion, calibration, curves)")
    return results
