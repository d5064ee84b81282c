"""How far the best epoch on the test set lies above the last epoch (issue 22, a diagnostic).

Some papers report the maximum test top-1 over epochs (LDAM-DRW's official code prints its
`best_acc1`); longtail reports the last epoch and best-on-validation. For runs trained with
`train.test_curve_from=E` (docs/training.md, "The test curve"), this prints per run: the
last epoch's test top-1 (eval.json), the best value of the test curve with its epoch, and the
difference, which is what the papers' selection adds. Nothing here selects anything.

    python benchmarks/best_on_test_gap.py runs/grids/cifar10_lt_full/ce/ratio100/seed0 ...
"""

from __future__ import annotations

import argparse
import sys

from longtail.errors import LongtailError
from longtail.rundir import RunDir


def gap(run_dir: str) -> dict:
    """{'run', 'last_epoch', 'last_top1', 'best_top1', 'best_epoch', 'gap', 'curve_from'} of one run."""
    run = RunDir(run_dir).require(trained=True)
    curve = [(r["epoch"], r["test_curve_top1"]) for r in run.read_metrics() if "test_curve_top1" in r]
    if not curve:
        raise LongtailError(f"{run_dir} has no test curve (train it, or resume it, with train.test_curve_from=E)")
    last = run.read_eval()
    best_epoch, best = max(curve, key=lambda e_t: (e_t[1], -e_t[0]))  # the earliest epoch of the maximum
    return {"run": str(run_dir), "last_epoch": last["epoch"], "last_top1": last["top1"], "best_top1": best,
            "best_epoch": best_epoch, "gap": best - last["top1"], "curve_from": curve[0][0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN")
    args = p.parse_args(argv)
    try:
        rows = [gap(r) for r in args.runs]
    except LongtailError as err:
        print(f"best_on_test_gap: error: {err}", file=sys.stderr)
        return 2
    print("| run | curve from epoch | last epoch top-1 | best on test (epoch) | best - last |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['curve_from']} | {r['last_top1']:.2f} (epoch {r['last_epoch']}) | "
              f"{r['best_top1']:.2f} ({r['best_epoch']}) | {r['gap']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
