"""`longtail demo`: long-tailed digits, CE against a re-balancing loss, side by side.

scikit-learn's bundled 8x8 digits (no download): a balanced test set of 50 images per
class is held out, the rest is subsampled to an exponential profile with imbalance ratio
10 (head class 0: 128 images, tail class 9: 12), and a small CNN is trained twice, with
plain cross-entropy and with the class-balanced loss (effective number, beta 0.999).
"""

from __future__ import annotations

from pathlib import Path

from .config import config_from_dict
from .errors import ConfigError
from .eval.metrics import format_summary
from .runs import train_run

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


def run_demo(out: str | Path = "longtail-demo", *, epochs: int = 30, progress: bool = True, log=print) -> dict:
    """Train both demo runs into out/<loss>/ and print the comparison; returns their eval dicts."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    out = Path(out)
    for name in DEMO_RUNS:
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; remove it or pass --out to another folder")
    results = {}
    for name, loss in DEMO_RUNS.items():
        log(f"== {name}: training {out / name}")
        cfg = config_from_dict(demo_config(loss, epochs=epochs, progress=progress))
        results[name] = train_run(cfg, out / name, log=lambda *a: None)
    first = next(iter(results.values()))
    counts, names = first["train_counts"], first["class_names"]
    log("")
    log(f"long-tailed digits: {sum(counts)} training images, counts {counts[0]}..{counts[-1]} "
        f"(ratio {counts[0] / counts[-1]:.1f}), balanced test {first['num_samples']} images")
    for name, res in results.items():
        log(format_summary(name, res))
    log("")
    header = f"{'class':>5} {'train n':>7} {'group':>6} " + " ".join(f"{n:>14}" for n in results)
    log(header)
    for c, n in enumerate(counts):
        group = next(g for g, idx in first["groups"].items() if c in idx)
        accs = " ".join(f"{res['per_class'][c]:>14.1f}" for res in results.values())
        log(f"{names[c]:>5} {n:>7} {group:>6} {accs}")
    log(f"\nrun folders: {', '.join(str(out / n) for n in results)} (eval.json, metrics.jsonl, checkpoints/)")
    return results
