"""Run a grid: every cell in dependency order, finished cells skipped, interrupted ones resumed.

A cell is *done* when its folder has `eval.json`; it is *resumed* when its folder has a
`config.yaml` but no `eval.json` (`train_run(resume=True)` continues from the last
checkpoint, or only evaluates when training had finished); otherwise it is *new*. A
cell folder that exists already must have been run with the cell's config (the
`train.progress` switch aside): a grid or override changed under finished cells is
refused rather than mixed into one table. A stage-2 cell runs only once its stage-1
cell is done (its `checkpoints/last.pt` is then the final epoch's); a branching cell
(`branch_from`) only once its source cell is done and kept `checkpoints/epoch<E>.pt`.
After each cell that ran, `bench.json` records its wall time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from ..config import SESSION_KEYS, diff_configs
from ..dist import pin_precision
from ..errors import CheckpointError, ConfigError, did_you_mean
from ..runs import evaluate_run, shared_precision, train_run
from ..io import atomic_write_text
from ..log import format_duration
from ..rundir import RunDir
from .grid import BENCH_RECORD, Cell, Grid

log = logging.getLogger(__name__)

# may differ between invocations of the same cell: save_epochs only keeps extra checkpoints, and the
# session keys change no number (progress, threads, train.test_curve_from, ...); a resumed cell
# takes the grid's session keys for its session (_resume_config)
IGNORED_KEYS = ("train.save_epochs", *SESSION_KEYS)
assert all(k.startswith("train.") for k in SESSION_KEYS)  # _resume_config sets them on cfg.train


def own_training(cell: Cell) -> tuple[float, dict[str, int]]:
    """(seconds, {machine label: epochs}) of the epochs this cell trained itself, over all its
    sessions: metrics.jsonl's rows past its branch point (a branch's prefix is its source's), the
    machines from sessions.jsonl ('not recorded' for epochs trained before sessions were)."""
    skip = cell.branch_epoch if cell.branch_source is not None else 0
    rows = [r for r in cell.run.read_metrics() if isinstance(r.get("epoch"), int) and r["epoch"] > skip]
    machines = cell.run.epoch_machines()
    counts: dict[str, int] = {}
    for r in rows:
        label = machines.get(r["epoch"], "not recorded")
        counts[label] = counts.get(label, 0) + 1
    return sum(float(r.get("seconds", 0.0)) for r in rows), counts


def cell_state(cell: Cell) -> str:
    """'done', 'resume' or 'new' (see the module docstring)."""
    if cell.run.has(RunDir.EVAL):
        return "done"
    if cell.run.is_run():
        return "resume"
    return "new"


# checkpoints of other cells (a stage 1, a pre-training), stored absolute in the cells' configs
CELL_PATH_KEYS = ("method.params.stage1", "model.weights")


def _dotted(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def _same_cell_file(saved, expected, out: Path) -> bool:
    """Whether a saved CELL_PATH_KEYS value names the same cell's file as the expected one, also
    when the grid's folder has moved since (copied to another machine, or kept in the repo as
    benchmarks/artifacts/...): the path below the grid's out decides."""
    if not (isinstance(saved, str) and isinstance(expected, str)):
        return False
    try:
        inside = Path(expected).resolve().relative_to(out.resolve()).parts
    except ValueError:  # not a file of this grid
        return False
    return Path(saved).parts[-len(inside):] == inside


def check_cell_config(cell: Cell) -> None:
    """A cell folder that exists must hold the cell's config; ConfigError naming the keys otherwise.
    A cell's checkpoint paths into its grid (CELL_PATH_KEYS) match wherever the grid's folder was."""
    if not cell.run.is_run():
        return
    saved = cell.run.read_config()
    out = cell.dir.parents[2]  # OUT/<method>/ratio<R>/seed<S>
    diffs = [k for k in diff_configs(pin_precision(cell.cfg, like=saved), saved) if k not in IGNORED_KEYS
             and not (k in CELL_PATH_KEYS and _same_cell_file(_dotted(saved, k), _dotted(cell.cfg, k), out))]
    if diffs:
        raise ConfigError(f"cell {cell.key} ({cell.dir}) was run with another config ({', '.join(diffs)}): "
                          "restore the grid and overrides it was run with, or remove the cell folder")


def _resume_config(cell: Cell, progress: bool | None):
    """The cell's saved config with the grid's session keys (SESSION_KEYS: they change no number),
    so an override such as train.test_curve_from=150 takes effect when an interrupted cell
    resumes; `progress` (when not None) switches the progress bar."""
    saved, mine = cell.run.read_config(), cell.cfg.train
    train = dataclasses.replace(saved.train, **{k.split(".", 1)[1]: getattr(mine, k.split(".", 1)[1])
                                                for k in SESSION_KEYS})
    if progress is not None:
        train = dataclasses.replace(train, progress=progress)
    return dataclasses.replace(saved, train=train)


def select_cells(grid: Grid, methods: list[str] | None, cells: list[str] | None = None) -> list[Cell]:
    """The cells of `methods` (all when None), or the cells named by key (`method/ratio<R>/seed<S>`),
    in run order; unknown names are a ConfigError."""
    if cells is not None:
        keys = [c.key for c in grid.cells]
        for key in cells:
            if key not in keys:
                raise ConfigError(f"'{key}' is not a cell of grid {grid.path}{did_you_mean(key, keys)}; "
                                  "`longtail bench GRID --list` lists them")
        return [c for c in grid.cells if c.key in cells]
    if methods is None:
        return list(grid.cells)
    names = [m.name for m in grid.methods]
    for name in methods:
        if name not in names:
            raise ConfigError(f"'{name}' is not a method of grid {grid.path}{did_you_mean(name, names)}; "
                              f"its methods: {', '.join(names)}")
    return [c for c in grid.cells if c.method in methods]


def _la_needed(cell: Cell) -> bool:
    if cell.logit_adjust_tau is None:
        return False
    try:
        la = cell.run.read_optional_json(RunDir.EVAL_LOGIT_ADJUSTED)
        return la is None or float(la.get("tau")) != cell.logit_adjust_tau
    except (ValueError, TypeError, CheckpointError):  # unreadable: written again
        return True


def plan(grid: Grid, *, methods: list[str] | None = None, cells: list[str] | None = None) -> list[tuple[Cell, str]]:
    """(cell, state) for the selected cells, after checking every existing cell's config and
    that each stage-2 cell's stage 1 is done or will run first."""
    cells = select_cells(grid, methods, cells)
    selected = {c.key for c in cells}
    out = []
    for cell in cells:
        check_cell_config(cell)
        first = cell.needs
        if first is not None and first.key not in selected and cell_state(first) != "done":
            what = cell.need_kind
            raise ConfigError(f"cell {cell.key} needs its {what} {first.key}, which is not finished: run it "
                              f"first (--methods {first.method}) or include it")
        out.append((cell, cell_state(cell)))
    return out


def run_grid(grid: Grid, *, methods: list[str] | None = None, cells: list[str] | None = None,
             progress: bool | None = None) -> list[dict]:
    """Run the selected cells of `grid` (see the module docstring) in this process, one after the
    other; returns one summary per cell: {'cell', 'state' (done / new / resume), 'seconds'}.
    `cells` selects cells by key instead of `methods`. `progress=False` turns the progress
    bars of new cells off; None keeps the configs' `train.progress`."""
    steps = plan(grid, methods=methods, cells=cells)
    # what the cells were run from; creates grid.out (an unwritable one is a one-line error)
    atomic_write_text(grid.out / "grid.yaml", grid.path.read_text())
    summary = []
    for k, (cell, _) in enumerate(steps, 1):
        state = cell_state(cell)  # again: an earlier step may be this cell's stage 1
        head = f"[{k}/{len(steps)}] {cell.key}"
        if state == "done":
            if _la_needed(cell):
                evaluate_run(cell.dir, logit_adjust_tau=cell.logit_adjust_tau)
                log.info(f"{head}: done; wrote {RunDir.EVAL_LOGIT_ADJUSTED} (tau {cell.logit_adjust_tau:g})")
            else:
                log.info(f"{head}: done, skipped")
            summary.append({"cell": cell.key, "state": "done", "seconds": 0.0})
            continue
        if cell.needs is not None and cell_state(cell.needs) != "done":
            raise ConfigError(f"cell {cell.key} needs {cell.needs.key}, which is not finished")
        branch = cell.branch_checkpoint if state == "new" else None
        if branch is not None and not branch.is_file():
            raise ConfigError(f"cell {cell.key} branches from {branch}, which its source cell did not keep (it ran "
                              f"without train.save_epochs [{cell.branch_epoch}]): remove {cell.branch_source.dir} "
                              "to rerun it, or place that checkpoint there")
        stage = f" ({cell.need_kind}: {cell.needs.key})" if cell.needs is not None else ""
        if branch is not None:
            stage = f" (from {cell.branch_source.key} at epoch {cell.branch_epoch})"
        log.info(f"{head}: {'resuming' if state == 'resume' else 'training'}{stage} -> {cell.dir}")
        started = time.time()
        if state == "resume":
            train_run(_resume_config(cell, progress), cell.dir, resume=True)
        else:
            cfg = cell.cfg
            if cfg.train.precision == "auto" and (chosen := shared_precision(c.dir for c in grid.cells)) is not None:
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=chosen))
                log.info(f"{head}: train.precision auto: {chosen}, the precision of the grid's other cells")
            if progress is not None:
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
            train_run(cfg, cell.dir, branch_from=branch)
        if _la_needed(cell):
            evaluate_run(cell.dir, logit_adjust_tau=cell.logit_adjust_tau)
        seconds = time.time() - started
        own_seconds, machines = own_training(cell)
        cell.run.write_json(BENCH_RECORD, {
            "cell": cell.key, "method": cell.method, "imbalance_ratio": cell.ratio, "seed": cell.seed,
            "config": grid.method(cell.method).config, "stage1": cell.stage1.key if cell.stage1 else None,
            "weights_from": cell.weights_source.key if cell.weights_source else None,
            "branch": f"{cell.branch_source.key}@{cell.branch_epoch}" if cell.branch_source else None,
            "mode": state, "wall_seconds": round(seconds, 3),
            "train_seconds": round(own_seconds, 3), "machines": machines,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        log.info(f"{head}: finished in {format_duration(seconds)}")
        summary.append({"cell": cell.key, "state": state, "seconds": seconds})
    return summary
