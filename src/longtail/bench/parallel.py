"""Run a grid's cells as concurrent processes: `longtail bench GRID --jobs N` (docs/bench.md).

Each cell runs in its own process, `python -m longtail bench GRID [overrides] --out OUT --cell
KEY --no-progress`, the same code path as a sequential grid restricted to that cell, so a cell
that fails (or is killed) never takes the others down, and rerunning the command resumes it.
At most `jobs` cells run at once; a cell starts once its stage-1 or branch-source cell is done,
in the grid's order otherwise. Each process gets a *slot*, 0 .. jobs - 1, that fixes where it
runs:

- on the CPU (the cells' `train.device` is `cpu`, or no GPU is visible): the cores this process
  may use are split into `jobs` disjoint sets, slot s pinned to set s (os.sched_setaffinity)
  with as many threads as cores in its set (`OMP_NUM_THREADS`); with more jobs than cores,
  slot s shares core s mod cores, one thread each;
- on GPUs: slot s sees GPU s mod n alone (`CUDA_VISIBLE_DEVICES`), so several cells share
  each GPU when jobs > n, with the CPU threads divided among the jobs.

An `OMP_NUM_THREADS` set by the user is kept. Each cell's console output goes to
`OUT/logs/<method>_ratio<R>_seed<S>.log`. When a cell fails, the cells that need it are
skipped, the others run on, and the command ends with one line naming the failed cells.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LongtailError
from ..log import format_duration
from .grid import Cell, Grid
from .runner import _la_needed, cell_state, plan

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """Where one concurrent cell runs: the environment it gets and the cores it is pinned to."""

    index: int
    env: dict[str, str]
    cores: set[int] | None = None  # None: not pinned
    label: str = ""


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """The GPUs a child process may be given (their CUDA_VISIBLE_DEVICES names); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named:
        return [n.strip() for n in named.split(",") if n.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def make_slots(jobs: int, *, gpus: list[str], cores: list[int], env: dict[str, str] | None = None) -> list[Slot]:
    """The `jobs` slots (module docstring): GPU slots when `gpus` is not empty, else CPU slots."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    base = dict(os.environ if env is None else env)
    user_threads = base.get("OMP_NUM_THREADS")
    slots = []
    for s in range(jobs):
        child = dict(base)
        if gpus:
            threads = max(1, len(cores) // jobs)
            child["CUDA_VISIBLE_DEVICES"] = gpus[s % len(gpus)]
            pinned, label = None, f"GPU {gpus[s % len(gpus)]}"
        elif jobs <= len(cores):
            per = len(cores) // jobs
            pinned = set(cores[s * per:(s + 1) * per])
            threads = per
            label = f"CPU core{'s' if per > 1 else ''} {','.join(str(c) for c in sorted(pinned))}"
        else:
            pinned, threads = {cores[s % len(cores)]}, 1
            label = f"CPU core {cores[s % len(cores)]} (shared)"
        if user_threads is None:
            child["OMP_NUM_THREADS"] = child["MKL_NUM_THREADS"] = str(threads)
        slots.append(Slot(index=s, env=child, cores=pinned, label=label))
    return slots


def log_path(grid: Grid, cell: Cell) -> Path:
    return grid.out / "logs" / (cell.key.replace("/", "_") + ".log")


@dataclass
class _Running:
    cell: Cell
    slot: Slot
    proc: subprocess.Popen
    started: float
    log_file: object = field(repr=False, default=None)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def run_parallel(grid: Grid, *, jobs: int, grid_arg: str, overrides: list[str], methods: list[str] | None = None,
                 cells: list[str] | None = None, gpus: list[str] | None = None) -> list[dict]:
    """Run the selected cells (`methods`, or `cells` by key) with at most `jobs` at once (module
    docstring); one summary per cell, {'cell', 'state' (done / new / resume / failed / skipped),
    'seconds'}. `grid_arg` and `overrides` are what the command line gave, handed to each cell's
    process unchanged."""
    steps = plan(grid, methods=methods, cells=cells)
    if gpus is None:
        on_cpu = all(c.cfg.train.device == "cpu" for c, _ in steps)
        gpus = [] if on_cpu else visible_gpus()
    slots = make_slots(jobs, gpus=gpus, cores=available_cores())
    free = list(reversed(slots))
    todo = [c for c, state in steps if state != "done" or _la_needed(c)]
    summary = {c.key: {"cell": c.key, "state": "done", "seconds": 0.0} for c, _ in steps}
    failed: set[str] = set()
    running: dict[int, _Running] = {}
    (grid.out / "logs").mkdir(parents=True, exist_ok=True)
    total = len(todo)
    log.info(f"{total} cell(s) to run, {jobs} at a time on {', '.join(s.label for s in slots)}")
    try:
        while todo or running:
            for cell in list(todo):
                if not free:
                    break
                need = cell.needs
                if need is not None and need.key in failed:
                    todo.remove(cell)
                    failed.add(cell.key)
                    summary[cell.key] = {"cell": cell.key, "state": "skipped", "seconds": 0.0}
                    log.info(f"{cell.key}: skipped, its {cell.need_kind} {need.key} failed")
                    continue
                if need is not None and cell_state(need) != "done":
                    continue
                todo.remove(cell)
                r = _start(grid, cell, free.pop(), grid_arg, overrides)
                running[r.proc.pid] = r
                summary[cell.key]["state"] = cell_state(cell)
                log.info(f"[{total - len(todo)}/{total}] {cell.key}: started on {r.slot.label} "
                         f"(log {log_path(grid, cell)})")
            if not running:
                break  # what is left waits for cells that failed
            pid, status = os.wait()
            r = running.pop(pid, None)
            if r is None:
                continue  # not one of the cells' processes
            code = os.waitstatus_to_exitcode(status)
            r.proc.returncode = code  # reaped here: Popen must not wait for it again
            r.log_file.close()
            free.append(r.slot)
            seconds = time.time() - r.started
            summary[r.cell.key]["seconds"] = seconds
            if code == 0:
                log.info(f"{r.cell.key}: finished in {format_duration(seconds)}")
            else:
                failed.add(r.cell.key)
                summary[r.cell.key]["state"] = "failed"
                log.warning(f"{r.cell.key}: failed (exit {code}) after {format_duration(seconds)}: "
                            f"{_last_line(log_path(grid, r.cell))}")
    except BaseException:
        for r in running.values():  # an interrupted grid resumes from the cells' checkpoints
            r.proc.terminate()
        for r in running.values():
            r.proc.wait()
            r.log_file.close()
        raise
    return [summary[c.key] for c, _ in steps]


def _start(grid: Grid, cell: Cell, slot: Slot, grid_arg: str, overrides: list[str]) -> _Running:
    command = [sys.executable, "-m", "longtail", "bench", grid_arg, *overrides, "--out", str(grid.out),
               "--cell", cell.key, "--no-progress"]
    path = log_path(grid, cell)
    handle = path.open("a")
    handle.write(f"$ {' '.join(command)}  # {slot.label}\n")
    handle.flush()
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=slot.env,
                            preexec_fn=_pinner(slot.cores))
    return _Running(cell=cell, slot=slot, proc=proc, started=time.time(), log_file=handle)


def _pinner(cores: set[int] | None):
    """What the child process runs before the cell: pin it to `cores` (None: not pinned)."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, set(cores))


def check_failures(summary: list[dict], grid: Grid) -> None:
    """A one-line LongtailError naming the failed and skipped cells, if any."""
    bad = [s["cell"] for s in summary if s["state"] in ("failed", "skipped")]
    if bad:
        raise LongtailError(f"{len(bad)} of {len(summary)} cells did not finish: {', '.join(bad)}; their logs are in "
                            f"{grid.out / 'logs'} (rerun the same command to resume them)")
