"""Adopt a finished run trained outside a grid (e.g. with benchmarks/run_queue.sh) as a grid cell.

    python benchmarks/adopt_cell.py GRID.yaml METHOD RUN_DIR [--ratio R] [--seed S]

Copies RUN_DIR into the cell folder OUT/<METHOD>/ratio<R>/seed<S>/ after checking that its
config.yaml is the cell's config (the same check `longtail bench` makes), and writes the
cell's bench.json with the run's wall time: the sum of the `exit ... wall_seconds N` lines
that benchmarks/run_queue.sh appended to RUN_DIR.log over all sessions, or, when a session
was cut off before it could write its line, the sum of the epochs' seconds in metrics.jsonl.
`longtail bench GRID.yaml --table-only` then tables it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from longtail.bench import load_grid
from longtail.bench.grid import BENCH_RECORD
from longtail.bench.runner import check_cell_config
from longtail.errors import LongtailError
from longtail.io import atomic_write_json
from longtail.rundir import RunDir


def wall_seconds(run: Path) -> tuple[float, str]:
    log = run.parent / f"{run.name}.log"
    if log.is_file():
        text = log.read_text()
        walls = [float(m) for m in re.findall(r"^exit \d+ wall_seconds (\d+)", text, re.M)]
        starts = len(re.findall(r"^data: ", text, re.M))  # one per (re)start of the run
        if walls and len(walls) >= starts:  # else a session was cut off before it could log its time
            return sum(walls), f"{log} ({len(walls)} session(s))"
    return sum(float(r.get("seconds", 0.0)) for r in RunDir(run).read_metrics()), f"{RunDir.METRICS} epoch seconds"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid")
    p.add_argument("method")
    p.add_argument("run")
    p.add_argument("--ratio", type=float, default=None, help="default: the grid's only ratio")
    p.add_argument("--seed", type=int, default=None, help="default: the grid's only seed")
    args = p.parse_args(argv)
    grid, run = load_grid(args.grid), Path(args.run)
    ratio = args.ratio if args.ratio is not None else grid.ratios[0]
    seed = args.seed if args.seed is not None else grid.seeds[0]
    cells = [c for c in grid.cells if c.method == args.method and c.ratio == ratio and c.seed == seed]
    if not cells:
        raise LongtailError(f"no cell {args.method} / ratio {ratio:g} / seed {seed} in {args.grid}")
    cell = cells[0]
    if not RunDir(run).has(RunDir.EVAL):
        raise LongtailError(f"{run} is not a finished run (no {RunDir.EVAL})")
    if cell.dir.exists():
        raise LongtailError(f"cell folder {cell.dir} exists already")
    check_cell_config(dataclasses.replace(cell, dir=run))  # before anything is copied
    cell.dir.parent.mkdir(parents=True, exist_ok=True)
    staged = cell.dir.parent / f".{cell.dir.name}.adopting"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(run, staged)
    seconds, source = wall_seconds(run)
    atomic_write_json(staged / BENCH_RECORD, {
        "cell": cell.key, "method": cell.method, "imbalance_ratio": cell.ratio, "seed": cell.seed,
        "config": grid.method(cell.method).config, "stage1": cell.stage1.key if cell.stage1 else None,
        "mode": "adopted", "adopted_from": str(run), "wall_seconds": round(seconds, 3), "wall_source": source,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    staged.rename(cell.dir)
    print(f"{cell.key}: adopted {run} ({seconds / 60:.1f} min, from {source})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LongtailError as err:
        print(f"adopt_cell: error: {err}", file=sys.stderr)
        sys.exit(2)
