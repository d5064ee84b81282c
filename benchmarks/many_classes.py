"""Evaluation outputs and tools at many classes (docs/evaluation.md, "Many classes").

Trains a width-4 small_cnn for one epoch on synthetic 8x8 arrays with C classes (2 test
images per class), evaluates it, and prints the sizes of eval.json and its companion files;
with --tools, also the time and peak memory of the report, doctor, similarity and the
GHM-CWAP / DLSA state at that class count.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/many_classes.py --classes 1000 4000 8142
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def synthetic_arrays(num_classes: int, *, train_max: int = 10, test_per_class: int = 2, seed: int = 0) -> dict:
    """8x8 RGB images, brightness by class; train counts from train_max down to 2 (exponential)."""
    rs = np.random.RandomState(seed)
    counts = np.maximum(2, np.round(train_max * (2 / train_max) ** (np.arange(num_classes) / max(num_classes - 1, 1))))
    tr_y = np.repeat(np.arange(num_classes), counts.astype(int))
    te_y = np.repeat(np.arange(num_classes), test_per_class)

    def images(labels):
        base = (labels % 200)[:, None, None, None]
        return np.clip(base + rs.randint(0, 40, size=(len(labels), 8, 8, 3)), 0, 255).astype(np.uint8)

    return {"train_images": images(tr_y), "train_labels": tr_y, "test_images": images(te_y), "test_labels": te_y}


def config(**eval_keys) -> dict:
    return {"data": {"source": "arrays", "profile": "none", "seed": 0},
            "model": {"name": "small_cnn", "params": {"width": 4}},
            "loss": {"name": "ce"}, "eval": dict(eval_keys),
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.05, "warmup_epochs": 0, "milestones": [],
                      "progress": False, "eval_batch_size": 512}}


def measured(fn):
    """(result, seconds, peak traced Python / numpy memory in MB) of fn()."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return out, seconds, peak


def run_one(num_classes: int, root: Path, *, tools: bool, eval_keys: dict) -> Path:
    from longtail.config import config_from_dict
    from longtail.rundir import RunDir
    from longtail.runs import train_run

    out = root / f"c{num_classes}"
    t0 = time.perf_counter()
    train_run(config_from_dict(config(**eval_keys)), out, arrays=synthetic_arrays(num_classes))
    run = RunDir(out)
    sizes = "  ".join(f"{p.name} {p.stat().st_size / 1e3:,.0f} kB" for p in sorted(out.iterdir())
                      if p.is_file() and p.suffix in (".json", ".npz") and p.name.startswith(("eval", "pred")))
    print(f"C={num_classes}: train+eval {time.perf_counter() - t0:.1f} s  {sizes}", flush=True)
    if tools:
        tool_times(run, num_classes)
    return out


def folder_kb(path: Path) -> str:
    files = [p for p in Path(path).rglob("*") if p.is_file() and "features" not in p.parts]
    return ", ".join(f"{p.name} {p.stat().st_size / 1e3:,.0f} kB" for p in sorted(files))


def tool_times(run, num_classes: int) -> None:
    """Time and peak memory of each tool that reads the run at this class count."""
    import torch

    from longtail.dlsa.cascade import DLSACascade, DLSAConfig
    from longtail.features import extract_features
    from longtail.doctor.confusable import confusable_pairs
    from longtail.doctor.plot import plot_class_counts
    from longtail.doctor.stats import class_statistics
    from longtail.losses.ghm_cwap import GHMCWAPLoss
    from longtail.report import build_report
    from longtail.similarity.command import analyse_run
    counts = np.asarray(run.read_data_info()["class_counts"])
    names = [str(i) for i in range(num_classes)]

    def report():
        build_report([str(run.path)], out=str(run.path / "report.html"))
        return f"report.html {(run.path / 'report.html').stat().st_size / 1e3:,.0f} kB"

    def similarity():  # the features cache first (data.source 'arrays' needs the arrays), then the command
        extract_features(run.path, device="cpu", arrays=synthetic_arrays(num_classes))
        analyse_run(run.path, out=run.path / "sim", device="cpu")
        return folder_kb(run.path / "sim")

    def doctor():  # what `longtail doctor` computes: statistics, the count figure, the ranked pairs
        stats = class_statistics(counts, names)
        plot_class_counts(stats, names, run.path / "doctor_counts.png")
        protos = np.random.RandomState(0).randn(num_classes, 64)
        ranked = confusable_pairs(protos, counts, min_ratio=2.0, top=10)
        return f"{ranked['num_pairs']:,} pairs ranked"

    def dlsa():  # a depth-1 cascade, 1 flow and 1 classifier epoch, on synthetic 64-d features
        feats = torch.randn(len(np.repeat(np.arange(num_classes), counts)), 64, generator=torch.Generator().manual_seed(0))
        labels = np.repeat(np.arange(num_classes), counts)
        cfg = DLSAConfig(depth=1, flow_epochs=1, cls_epochs=1, eval_every=1, flow_select="last")
        cascade = DLSACascade(cfg, num_classes).fit(feats, labels)
        stage = cascade.stages[0]
        size = sum(t.numel() * t.element_size() for _, snap in stage.snapshots for t in snap.values())
        return (f"{len(feats):,} samples, K={cascade.info[0]['clusters']}, cluster-aided classifier snapshot "
                f"{size / 1e6:,.0f} MB (C x C prior linear)")

    def ghm():
        loss = GHMCWAPLoss(class_counts=counts)
        logits = torch.randn(256, num_classes)
        target = torch.randint(0, num_classes, (256,))
        loss(logits, target)
        state = loss.state_dict()
        return f"state_dict {sum(t.numel() * t.element_size() for t in state.values()) / 1e6:.1f} MB"

    for name, fn in (("report", report), ("similarity", similarity), ("doctor", doctor), ("dlsa", dlsa),
                     ("ghm_cwap step+state", ghm)):
        try:
            out, s, mb = measured(fn)
            print(f"  {name}: {s:.2f} s, peak {mb:.0f} MB (tracemalloc); {out}", flush=True)
        except Exception as err:  # noqa: BLE001 - a benchmark reports what fails
            print(f"  {name}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def main(argv=None) -> None:
    from longtail.dist import cpu_model
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--tools", action="store_true", help="also time the report, doctor, similarity, GHM-CWAP, DLSA")
    ap.add_argument("--logits", default=None, help="eval.logits_dtype (float32, float16, topk)")
    ap.add_argument("--topk", type=int, default=None, help="eval.logits_topk")
    ap.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    eval_keys = {k: v for k, v in (("logits_dtype", args.logits), ("logits_topk", args.topk)) if v is not None}
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for c in args.classes:
            run_one(c, root, tools=args.tools, eval_keys=eval_keys)
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
