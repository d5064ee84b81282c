"""The toy example (Section 3): per-class accuracy as majority counts grow or the minority shrinks.

"Towards Understanding the Long-Tailed Problem: A Unified Perspective", Section 3, on
CIFAR-10 (paper: the first nine classes are "class-1 ... class-9", the last is "class-10"):

- Case 1, increasing majority samples: classes 1-9 have n images each, n = 100, 200, ...,
  5,000; class 10 keeps 100.
- Case 2, decreasing minority samples: classes 1-9 keep 5,000; class 10 has n = 5,000,
  4,900, ..., 100.

Every point is trained from scratch and its per-class test accuracy recorded (Figures 1-2).
Readings chosen where the paper leaves it open (its experimental details are in an appendix
we do not have): every point trains for the same number of epochs (so larger sets also get
more SGD steps, as in the paper's fixed-epoch protocol); the step is configurable (the paper
uses 100, i.e. 50 points per case); "class-10" is the last class index (CIFAR-10: truck;
digits: 9) and classes 1-9 are indices 0-8. Points are named by their counts
(`m<majority>_n<minority>_s<seed>`), so the shared point (5,000 x 9, 100) is trained once.
Counts are exact: `data.profile: counts`, whose subsets are nested (for one seed, a class's
first n images are the same for every n).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ._points import Budget, figure, png_bytes, run_point, write_png, write_results

log = logging.getLogger(__name__)

CASES = (1, 2)


def count_grid(min_count: int, max_count: int, step: int) -> list[int]:
    """min_count, min_count + step, ..., always ending at max_count (ascending)."""
    if min_count < 1 or max_count < min_count:
        raise ConfigError(f"counts need 1 <= --min-count <= --max-count, got {min_count} and {max_count}")
    if step < 1:
        raise ConfigError(f"--step must be >= 1, got {step}")
    grid = list(range(min_count, max_count + 1, step))
    if grid[-1] != max_count:
        grid.append(max_count)
    return grid


def toy_counts(case: int, varied: int, *, min_count: int, max_count: int, num_classes: int = 10) -> list[int]:
    """Per-class training counts of one point, class-index order (the minority is the last class).

    Case 1: [varied] * (C-1) + [min_count]; case 2: [max_count] * (C-1) + [varied].
    """
    if case == 1:
        return [int(varied)] * (num_classes - 1) + [int(min_count)]
    if case == 2:
        return [int(max_count)] * (num_classes - 1) + [int(varied)]
    raise ConfigError(f"case must be 1 or 2, got {case!r}")


def toy_points(cases, grid: list[int], *, min_count: int, max_count: int) -> list[dict]:
    """The points in run order: case 1 ascending, case 2 descending (as the paper describes)."""
    points = []
    for case in cases:
        if case not in CASES:
            raise ConfigError(f"--cases must be a list of 1 and/or 2, got {case!r}")
        for varied in (grid if case == 1 else grid[::-1]):
            points.append({"case": case, "varied": varied,
                           "counts": toy_counts(case, varied, min_count=min_count, max_count=max_count)})
    return points


def point_config(counts: list[int], budget: Budget, seed: int) -> dict:
    return {"data": {**budget.data_section(), "profile": "counts", "counts": list(counts), "seed": seed},
            "model": budget.model_section(), "loss": {"name": "ce"}, "train": budget.train_section(seed)}


def run_toy(out: str | Path, *, budget: Budget, min_count: int, max_count: int, step: int, cases=CASES,
            seeds=(0,)) -> dict:
    """Train every point (skipping finished ones); write results.json/csv and toy.png into `out`."""
    out = Path(out)
    grid = count_grid(min_count, max_count, step)
    points = toy_points(cases, grid, min_count=min_count, max_count=max_count)
    settings = {"study": "toy", "paper_section": "3", "data": budget.data, "root": budget.root,
                "model": f"small_cnn width {budget.width}", "epochs": budget.epochs, "min_count": min_count,
                "max_count": max_count, "step": step, "grid": grid, "cases": list(cases), "seeds": list(seeds),
                "minority_class": "last class index (the paper's class-10)"}
    results, rows = [], []
    total = len(points) * len(seeds)
    for seed in seeds:
        for p in points:
            majority, minority = p["counts"][0], p["counts"][-1]
            name = f"m{majority:05d}_n{minority:05d}_s{seed}"
            ev = run_point(point_config(p["counts"], budget, seed), out / "runs" / name)
            if ev["train_counts"] != p["counts"]:
                raise ConfigError(f"{out / 'runs' / name} holds counts {ev['train_counts']}, expected {p['counts']}")
            entry = {"case": p["case"], "varied": p["varied"], "seed": seed, "majority_count": majority,
                     "minority_count": minority, "run": f"runs/{name}", "top1": ev["top1"],
                     "per_class": ev["per_class"], "train_counts": ev["train_counts"],
                     "class_names": ev.get("class_names")}
            results.append(entry)
            rows.append({"case": p["case"], "seed": seed, "majority_count": majority, "minority_count": minority,
                         "top1": round(ev["top1"], 2),
                         **{f"acc_class{c + 1}": (None if v is None else round(v, 2))
                            for c, v in enumerate(ev["per_class"])}})
            write_results(out, {**settings, "points": results}, rows)
            log.info(f"[{len(results)}/{total}] case {p['case']} seed {seed}: classes 1-9 x {majority}, class-10 "
                     f"{minority}: top1 {ev['top1']:.1f}, class-10 {ev['per_class'][-1]:.1f}")
    write_png(out / "toy.png", toy_figure(results, cases))
    return {**settings, "points": results}


def _mean_curves(results: list[dict], case: int) -> tuple[np.ndarray, np.ndarray]:
    """x = varied count (ascending), y = (len(x), C) per-class accuracy averaged over seeds."""
    sel = [r for r in results if r["case"] == case]
    xs = sorted({r["varied"] for r in sel})
    ys = np.array([np.mean([[np.nan if v is None else v for v in r["per_class"]] for r in sel if r["varied"] == x],
                           axis=0) for x in xs])
    return np.asarray(xs), ys


def toy_figure(results: list[dict], cases=CASES) -> bytes:
    """One panel per case: per-class test accuracy against the varied count; class-10 in red."""
    cases = [c for c in CASES if c in cases]
    fig = figure(6.0 * len(cases), 4.2)
    titles = {1: "Case 1: classes 1-9 grow, class-10 fixed", 2: "Case 2: classes 1-9 fixed, class-10 shrinks"}
    xlabels = {1: "training images per class, classes 1-9", 2: "training images of class-10"}
    names = next((r.get("class_names") for r in results if r.get("class_names")), None)
    for i, case in enumerate(cases):
        ax = fig.add_subplot(1, len(cases), i + 1)
        xs, ys = _mean_curves(results, case)
        if len(xs) == 0:
            continue
        C = ys.shape[1]
        for c in range(C - 1):
            ax.plot(xs, ys[:, c], color="0.65", lw=0.9, marker=".", ms=3,
                    label="classes 1-9, each" if c == 0 else None)
        ax.plot(xs, ys[:, :-1].mean(axis=1), color="black", lw=1.6, ls="--", label="mean of classes 1-9")
        ax.plot(xs, ys[:, -1], color="#d62728", lw=2.4, marker="o", ms=4,
                label="class-10" + (f" ({names[-1]})" if names else ""))
        if case == 2:
            ax.invert_xaxis()  # the paper's direction: class-10 decreases from left to right
        ax.set_title(titles[case], fontsize=10)
        ax.set_xlabel(xlabels[case])
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)
