"""Whether a run's test accuracy is held back by its BatchNorm statistics (issue 22, a diagnostic).

A network trained with mixup keeps BatchNorm running statistics of *mixed* images, and is
tested on clean ones. This prints, per run, the test top-1 (and many / medium / few) of its
checkpoint as saved, then again after the running mean and variance of every BatchNorm layer
are re-estimated on the run's own clean training images (a cumulative average over one pass in
a random order, `momentum=None`; no weight changes, no gradient), in two ways: with the run's
train-time crop and flip (`aug`: what a CE run's statistics see) and without augmentation (`plain`). A run
whose top-1 rises here has statistics that do not fit its test images; a plain CE run should
move by noise only. Nothing is selected on the test set: all rows are printed.

    python benchmarks/bn_recalibration.py runs/grids/cifar10_lt_full/ce/ratio100/seed0 \
        runs/grids/cifar10_lt_full/mislas_stage1/ratio100/seed0

It prints the CPU and the torch version with the table; the checkpoints are read, never written.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from longtail.data.augment import BatchAugment
from longtail.data.build import build_data
from longtail.dist import cpu_model
from longtail.errors import LongtailError
from longtail.eval.metrics import compute_metrics
from longtail.eval.predict import predict
from longtail.rundir import RunDir
from longtail.runmodel import load_run_model


def _test_row(model, data, cfg) -> dict:
    out = predict(model, data.test, mean=data.mean, std=data.std, batch_size=cfg.train.eval_batch_size,
                  channels_last=cfg.train.channels_last)
    m = compute_metrics(out["logits"], out["labels"], data.class_counts)
    return {k: m.get(k) for k in ("top1", "many", "medium", "few")}


@torch.no_grad()
def recalibrate(model: torch.nn.Module, data, cfg, *, augment: bool, seed: int = 0) -> int:
    """Re-estimate every BatchNorm layer's running statistics on the training split, in place.

    One pass over the split in a random order (a split is stored class by class, and batches of
    one class would estimate the within-class variance only), batches of train.batch_size, the
    run's crop / flip when `augment`, order and augmentation drawn from a generator seeded with
    `seed`; a cumulative average over batches (`momentum=None`). Returns the number of BatchNorm
    layers reset (0: nothing to do)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    a = cfg.train.augment
    transform = BatchAugment(mean=data.mean, std=data.std, crop_padding=a.crop_padding if augment else 0,
                             flip=a.flip if augment else False, channels_last=cfg.train.channels_last)
    generator = torch.Generator().manual_seed(seed)
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        split, size = data.train, cfg.train.batch_size
        order = torch.randperm(len(split), generator=generator).numpy()
        for start in range(0, len(split), size):
            pos = np.sort(order[start:start + size])
            model(transform(torch.from_numpy(split.batch(pos)), generator))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(norms)


def rows_of(run_dir: str, which: str = "last", *, arrays: dict | None = None) -> list[dict]:
    """The three rows of one run (statistics as saved, re-estimated with 'aug', with 'plain');
    `arrays`: the run's in-memory images, for a run of `data.source: arrays`."""
    run = RunDir(run_dir).require(trained=True)
    cfg = run.read_config()
    data = build_data(cfg.data, arrays=arrays)
    rows = []
    for stats in ("as saved", "aug", "plain"):
        model, epoch, _ = load_run_model(run, which=which, device="cpu", cfg=cfg, info=data.info)
        if stats != "as saved" and not recalibrate(model, data, cfg, augment=stats == "aug"):
            raise LongtailError(f"{run_dir}: the network has no BatchNorm layer to re-estimate")
        rows.append({"run": run_dir, "epoch": epoch, "stats": stats, **_test_row(model, data, cfg)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--checkpoint", choices=("last", "best_val"), default="last")
    args = p.parse_args(argv)
    try:
        rows = [r for run in args.runs for r in rows_of(run, args.checkpoint)]
    except LongtailError as err:
        print(f"bn_recalibration: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), checkpoint {args.checkpoint}")
    print("| run | epoch | BatchNorm statistics | test top-1 | many | medium | few |")
    print("|---|---:|---|---:|---:|---:|---:|")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        print(f"| {r['run']} | {r['epoch']} | {r['stats']} | {fmt(r['top1'])} | {fmt(r['many'])} | "
              f"{fmt(r['medium'])} | {fmt(r['few'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
