"""`longtail runs [DIR]`: the run folders under DIR (default runs/), one row each.

A run folder is a folder with a config.yaml (`RunDir.is_run`), found recursively (a run
folder's own sub-folders are not searched). Per run, read through RunDir only:

- method, loss, sampler, re-weighting, data source and imbalance ratio: config.yaml;
- epochs done / planned: metrics.jsonl (its rows, one per finished epoch) / train.epochs;
  a post-hoc method (posthoc.json) trains no epochs;
- status: `running` when a live process holds the run's lock (asked without taking it,
  `RunDir.lock_holder`), `finished` when eval.json exists and every planned epoch is done
  (post-hoc: eval.json exists), `interrupted` otherwise (`longtail train --out RUN --resume`
  continues it), `unreadable` when config.yaml or eval.json cannot be read (a warning names it);
- left: for a running or interrupted run, the time its remaining epochs take at the median
  `seconds` of its last EPOCHS_FOR_ESTIMATE epochs (metrics.jsonl; a median, so an epoch that
  held a pause does not move it), evaluation not counted; the first epoch of each training
  session (sessions.jsonl: a new run's epoch 1, a resume's first epoch) is left out while other
  epochs remain, since it holds the session's start-up (with two epochs done the median would be
  their mean); the CSV has that median (`epoch_seconds`) and the estimate (`seconds_left`);
- last-epoch top-1 and many / medium / few, and best-on-validation top-1 (the CSV also its
  many / medium / few), from eval.json; empty where there is none. A pre-training run scored on
  its pretext task (eval.json `task`, SSP's rotation) shows that task's top-1, no shot groups,
  and its method as e.g. `ssp (rotation task)`.

Rows sort by any column (`--sort KEY`, `--reverse`; empty values last either way) and print
as a table or as CSV (`--csv`, `--format csv`) with every field in its own column.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import statistics
from pathlib import Path

from .errors import ConfigError, LongtailError, did_you_mean
from .log import format_duration
from .rundir import RunDir

log = logging.getLogger(__name__)

STATUSES = ("running", "finished", "interrupted", "unreadable")
FIELDS = ("run", "method", "loss", "sampler", "reweight", "source", "imbalance_ratio", "epochs_done",
          "epochs_planned", "status", "epoch_seconds", "seconds_left", "top1", "many", "medium", "few",
          "best_val_top1", "best_val_many", "best_val_medium", "best_val_few")
TABLE_COLUMNS = ("run", "method", "loss", "data", "epochs", "status", "left", "top1", "many", "medium", "few",
                 "best_val_top1")
SORT_KEYS = (*FIELDS, "data", "epochs", "left")
METRICS = ("top1", "many", "medium", "few")
EPOCHS_FOR_ESTIMATE = 10


def find_runs(root: str | Path) -> list[RunDir]:
    """Run folders at or under `root`, in path order; a one-line error for a missing root."""
    root = Path(root)
    if not root.exists():
        raise LongtailError(f"folder not found: {root} (longtail runs DIR lists the run folders under DIR)")
    if not root.is_dir():
        raise LongtailError(f"not a folder: {root} (longtail runs DIR lists the run folders under DIR)")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if RunDir(dirpath).is_run():
            found.append(RunDir(dirpath))
            dirnames[:] = []  # checkpoints/, features/: not runs
    return found


def _section(cfg: dict, key: str) -> dict:
    """A config section as a mapping ({} when absent or not a mapping: an old or hand-edited run)."""
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def _name(section: dict) -> str | None:
    return section.get("name")


def _epochs(run: RunDir) -> tuple[int, float | None]:
    """(epochs recorded in metrics.jsonl, the median `seconds` of the last EPOCHS_FOR_ESTIMATE of
    them or None): one row per finished epoch (rows of epochs a resume redid are dropped by the
    loop; counted once here either way). A session's first epoch counts only when nothing else does."""
    rows = {r["epoch"]: r for r in run.read_metrics() if isinstance(r.get("epoch"), int)}
    firsts = {s["start_epoch"] + 1 for s in run.read_sessions() if isinstance(s.get("start_epoch"), int)}
    epochs = [e for e in sorted(rows) if e not in firsts] or sorted(rows)
    seconds = [_metric(rows[e], "seconds") for e in epochs[-EPOCHS_FOR_ESTIMATE:]]
    seconds = [v for v in seconds if v is not None]
    return len(rows), float(statistics.median(seconds)) if seconds else None


def _metric(block, key: str) -> float | None:
    value = block.get(key) if isinstance(block, dict) else None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def run_row(run: RunDir, root: Path) -> dict:
    """One run's FIELDS (None where unknown)."""
    rel = run.path.relative_to(root)
    row = dict.fromkeys(FIELDS)
    row["run"] = str(rel) if str(rel) != "." else str(run.path)
    try:
        cfg = run.read_config_mapping()
        ev = run.read_optional_json(RunDir.EVAL)
    except LongtailError as err:
        log.warning(f"{row['run']}: {str(err).splitlines()[0]}")
        row["status"] = "unreadable"
        return row
    data, train = _section(cfg, "data"), _section(cfg, "train")
    row.update(method=_name(_section(cfg, "method")) or "standard", loss=_name(_section(cfg, "loss")),
               sampler=_name(_section(cfg, "sampler")) or "instance",
               reweight=_section(cfg, "reweight").get("scheme", "none"), source=data.get("source"),
               imbalance_ratio=data.get("imbalance_ratio"))
    posthoc = run.has(RunDir.POSTHOC)
    epoch_seconds = None
    if not posthoc:
        (row["epochs_done"], epoch_seconds), row["epochs_planned"] = _epochs(run), train.get("epochs")
    for key in METRICS:
        row[key] = _metric(ev, key)
        row[f"best_val_{key}"] = _metric((ev or {}).get("best_val"), key)
    task = (ev or {}).get("task")
    if task:  # a pretext task (SSP's rotation): its top-1, no shot groups of its labels
        row["method"] = f"{row['method']} ({task} task)"
        row.update({k: None for k in FIELDS if k.endswith(("many", "medium", "few"))})
    done = ev is not None and (posthoc or row["epochs_done"] == row["epochs_planned"])
    row["status"] = "running" if run.lock_holder() else "finished" if done else "interrupted"
    planned = row["epochs_planned"]
    if row["status"] != "finished" and epoch_seconds is not None:
        row["epoch_seconds"] = epoch_seconds
        if isinstance(planned, int) and not isinstance(planned, bool):
            row["seconds_left"] = epoch_seconds * max(planned - row["epochs_done"], 0)
    return row


def progress_text(run: RunDir) -> str:
    """One unfinished run's progress for a line of text: '12/200 epochs, running, 2.36 h left'."""
    row = run_row(run, run.path)
    parts = [f"{_cell(row, 'epochs')} epochs", row["status"]]
    if row["seconds_left"] is not None:
        parts.append(f"{_cell(row, 'left')} left")
    return ", ".join(parts)


def list_runs(root: str | Path = "runs", *, sort: str = "run", reverse: bool = False) -> list[dict]:
    """The rows of every run folder under `root` (module docstring), sorted by `sort`."""
    if sort not in SORT_KEYS:
        raise ConfigError(f"unknown sort key '{sort}'{did_you_mean(sort, SORT_KEYS)}; known: {', '.join(SORT_KEYS)}")
    root = Path(root)
    rows = [run_row(run, root) for run in find_runs(root)]
    return sort_rows(rows, sort, reverse=reverse)


def _sort_value(row: dict, key: str):
    if key == "data":
        return None if row["source"] is None else (str(row["source"]), _number(row["imbalance_ratio"]))
    if key == "epochs":
        return row["epochs_done"]
    if key == "left":
        return row["seconds_left"]
    value = row[key]
    return value if value is None or isinstance(value, (int, float)) else str(value)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def sort_rows(rows: list[dict], key: str, *, reverse: bool = False) -> list[dict]:
    """Rows sorted by `key` (ties: by run), rows without a value last in either direction."""
    rows = sorted(rows, key=lambda r: r["run"])
    present = [r for r in rows if _sort_value(r, key) is not None]
    missing = [r for r in rows if _sort_value(r, key) is None]
    return sorted(present, key=lambda r: _sort_value(r, key), reverse=reverse) + missing


def _cell(row: dict, column: str) -> str:
    if column == "data":
        ratio = row["imbalance_ratio"]
        ratio = f"{ratio:g}" if isinstance(ratio, (int, float)) else str(ratio)
        return "-" if row["source"] is None else f"{row['source']} (ratio {ratio})"
    if column == "epochs":
        if row["status"] == "unreadable":
            return "-"
        planned = "?" if row["epochs_planned"] is None else row["epochs_planned"]
        return "post-hoc" if row["epochs_done"] is None else f"{row['epochs_done']}/{planned}"
    if column == "left":
        return "-" if row["seconds_left"] is None else format_duration(row["seconds_left"])
    value = row[column]
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    """Aligned text: TABLE_COLUMNS (numbers right-aligned), then a count by status."""
    cells = [[_cell(r, c) for c in TABLE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    numeric = [c in METRICS or c.startswith("best_val") or c in ("epochs", "left") for c in TABLE_COLUMNS]

    def line(values) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUSES
                       if any(r["status"] == s for r in rows))
    body = [line(TABLE_COLUMNS), *[line(c) for c in cells]]
    return "\n".join(v.rstrip() for v in body) + f"\n{len(rows)} run(s): {counts}\n"


def format_csv(rows: list[dict]) -> str:
    """CSV of FIELDS (header included); empty cells where unknown, numbers as read."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIELDS)
    for row in rows:
        writer.writerow(["" if row[f] is None else row[f] for f in FIELDS])
    return buffer.getvalue()


def _cmd_runs(args) -> int:
    rows = list_runs(args.dir, sort=args.sort, reverse=args.reverse)
    if args.format == "csv":
        print(format_csv(rows), end="")
    elif rows:
        print(format_table(rows), end="")
    else:
        print(f"no run folders under {args.dir} (a run folder holds {RunDir.CONFIG})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("runs", help="list the run folders under DIR: recipe, epochs, status, accuracies")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="folder searched recursively (default runs)")
    p.add_argument("--sort", default="run", metavar="KEY",
                   help=f"column to sort by (default run): {', '.join(SORT_KEYS)}")
    p.add_argument("--reverse", action="store_true", help="sort in descending order")
    p.add_argument("--format", choices=("table", "csv"), default="table", help="table (default) or csv")
    p.add_argument("--csv", dest="format", action="store_const", const="csv", help="same as --format csv")
    p.set_defaults(func=_cmd_runs)
