"""Keep a grid's cells in the repo, so that a long grid outlives the machine it runs on.

    python benchmarks/keep_cells.py GRID.yaml --from RUNS --to KEPT [--last-of ce,bs] [overrides ...]
    python benchmarks/keep_cells.py GRID.yaml --from RUNS --to KEPT --restore [overrides ...]

A session's machine need not outlive the session: on 2026-12-07 the project's runs/ folder was
gone when the next session began, with two 200-epoch cells in flight. What lasts is the repo, so
at the end of a session this copies every cell folder of RUNS (the grid's out) to KEPT/<method>/
ratio<R>/seed<S>/ with its files outside checkpoints/ up to --max-mb MiB each (config, metrics,
eval, bench.json, DLSA results, ...) and, of its checkpoints, only those still needed:
- an unfinished cell's last.pt and best_val.pt (it resumes from them, and its best-on-validation
  evaluation needs the second);
- a finished cell's last.pt while a cell that starts from it (a stage 2, a pre-trained start) is
  not done in RUNS, and always for the methods named by --last-of (e.g. DLSA's backbones);
- a branch source's epoch<E>.pt while a cell that branches from it at epoch E is not done (also
  when the source itself is cut off past E: resumed, it would not write that file again).
Each kept cell replaces its earlier copy whole (staged beside it, then renamed). `--restore` copies
the kept cells that RUNS lacks into it; `longtail bench` then skips the finished ones and resumes
the others (their configs name RUNS' paths, so restore to the folder they were kept from). `longtail
bench GRID --out KEPT --table-only` tables the kept cells directly (docs/bench.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from longtail.bench import load_grid
from longtail.bench.grid import Cell, Grid
from longtail.bench.runner import cell_state
from longtail.errors import LongtailError
from longtail.rundir import RunDir


def needed_checkpoints(grid: Grid, cell: Cell, last_of: set[str]) -> list[Path]:
    """The checkpoints of `cell` (paths relative to its folder) that are still needed (module docstring)."""
    state = cell_state(cell)
    if state == "new":
        return []
    waiting = [c for c in grid.cells if cell_state(c) != "done"]
    if state == "resume":
        keep = [Path(RunDir.LAST), Path(RunDir.BEST_VAL)]
    elif cell.method in last_of or any(c.stage1 is cell or c.weights_source is cell for c in waiting):
        keep = [Path(RunDir.LAST)]
    else:
        keep = []
    # a cut-off source past its branch point cannot write the checkpoint again
    for epoch in sorted({c.branch_epoch for c in waiting if c.branch_source is cell}):
        keep.append(cell.run.epoch_checkpoint(epoch).relative_to(cell.dir))
    return [p for p in keep if (cell.dir / p).is_file()]


def _replace(staged: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def keep(grid: Grid, dest: Path, *, last_of: set[str], max_bytes: int) -> list[str]:
    """Copy every cell folder of the grid's out to `dest` (module docstring); one line per cell."""
    lines = []
    for cell in grid.cells:
        if not cell.run.is_run():
            continue
        target = dest / cell.dir.relative_to(grid.out)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.parent / f".{target.name}.keeping"
        shutil.rmtree(staged, ignore_errors=True)
        skipped = []

        def ignore(folder: str, names: list[str]) -> set[str]:
            out = {RunDir.CHECKPOINTS} if Path(folder) == cell.dir else set()
            for name in names:
                path = Path(folder) / name
                if path.is_file() and (name.startswith(".") or path.stat().st_size > max_bytes):
                    out.add(name)
                    if not name.startswith("."):
                        skipped.append(str(path.relative_to(cell.dir)))
            return out

        shutil.copytree(cell.dir, staged, ignore=ignore)
        checkpoints = needed_checkpoints(grid, cell, last_of)
        for rel in checkpoints:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cell.dir / rel, staged / rel)
        _replace(staged, target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 2**20
        lines.append(f"{cell.key}: {cell_state(cell)}, kept {', '.join(p.name for p in checkpoints) or 'no checkpoint'}"
                     f" ({size:.1f} MiB){'; left out (too large): ' + ', '.join(skipped) if skipped else ''}")
    return lines


def restore(grid: Grid, kept: Path) -> list[str]:
    """Copy the cells kept under `kept` that the grid's out lacks into it; one line per cell."""
    lines = []
    for cell in grid.cells:
        source = kept / cell.dir.relative_to(grid.out)
        if not RunDir(source).is_run() or cell.dir.exists():
            continue
        cell.dir.parent.mkdir(parents=True, exist_ok=True)
        staged = cell.dir.parent / f".{cell.dir.name}.restoring"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        staged.rename(cell.dir)
        lines.append(f"{cell.key}: restored ({cell_state(cell)})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("overrides", nargs="*", help="the grid's overrides, as given to longtail bench")
    p.add_argument("--from", dest="runs", required=True, help="the grid's out (its cell folders)")
    p.add_argument("--to", dest="kept", required=True, help="where the kept cells live (in the repo)")
    p.add_argument("--restore", action="store_true", help="copy kept cells that --from lacks back into it")
    p.add_argument("--last-of", default="", help="comma-separated methods whose finished cells keep last.pt")
    p.add_argument("--max-mb", type=float, default=1.0, help="largest file kept outside checkpoints/ (MiB)")
    args = p.parse_args(argv)
    grid = load_grid(args.grid, out=args.runs, overrides=args.overrides)
    kept = Path(args.kept)
    if args.restore:
        if not kept.is_dir():
            raise LongtailError(f"no kept cells at {kept}")
        lines = restore(grid, kept)
    else:
        if not grid.out.is_dir():
            raise LongtailError(f"no grid folder at {grid.out}")
        names = {m.name for m in grid.methods}
        last_of = {m.strip() for m in args.last_of.split(",") if m.strip()}
        if last_of - names:
            raise LongtailError(f"--last-of names no method of the grid: {', '.join(sorted(last_of - names))}")
        lines = keep(grid, kept, last_of=last_of, max_bytes=int(args.max_mb * 2**20))
    print("\n".join(lines) if lines else "no cell to copy")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LongtailError as err:
        print(f"keep_cells.py: error: {err}", file=sys.stderr)
        sys.exit(2)
