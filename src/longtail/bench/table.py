"""Paper-style tables of a grid: mean and standard deviation over seeds, from the cells' files.

Rows are the grid's methods (file order), plus "<method> + post-hoc LA" where the cells
have `eval_logit_adjusted.json` and "<method> + DLSA" where they have `dlsa/dlsa.json` (`longtail
dlsa CELL --out CELL/dlsa`, as benchmarks/full_protocol.sh runs it: seed 002 on the cell's frozen
last-epoch features; its last-epoch entry is DLSA at its configured depth after its last classifier
epoch, its best-on-validation entry the depth and epoch chosen on validation, `dlsa_val_selected`,
like a stage-2 row's best epoch on its stage 1); for each imbalance ratio the columns are overall top-1
and many / medium / few accuracy (%), or with the grid's `groups: four` many / medium / few /
rare from eval.json `four_group` (docs/evaluation.md). Three tables: the last epoch (eval.json
top level), when any cell has one, the best-on-validation epoch (eval.json `best_val`), and when
any cell has a test curve (train.test_curve_from), its best test epoch, a diagnostic of the
papers' selection on the test set (metrics.jsonl `test_curve_*`; rows without a curve left out).
With the grid's `baseline: NAME`, a fourth table, the gain over NAME: each method's last-epoch
numbers minus the NAME cell's of the same ratio and seed, over the seeds both finished, beside
the paper's own gain (`published` - `published_baseline`, one table of the paper). A gap to a
published number that the gains do not show lies in what every row shares with the baseline
(data, selection, seed, precision); a gap in the gain is the method's own.
A pre-training cell scored on its pretext task (eval.json `task`, e.g. SSP's 4-way rotation) is
the row "<method> (<task> pre-training task)" with that task's top-1 only: its shot groups are
over the task's labels, not the grid's classes, so they are left empty.

Each entry is the mean over the finished seeds and the *sample* standard deviation
(numpy `ddof=1`); with one seed only the value is shown. A group that is empty (null in
eval.json, e.g. `few` on CIFAR-10-LT at ratio 100) is '-', a (method, ratio) with no
finished cell 'pending', a method whose finished cells have no best-on-validation
numbers (post-hoc methods) 'n/a', a ratio the method does not run at (its own
`imbalance_ratios`) 'not run'; `[k/n]` after the top-1 entry marks k of n seeds finished.
Where a method states `published` numbers, each ratio gets a 'paper' column beside its top-1
and the table is followed by each method's `published_source`. `results.md` and `results.csv` are written atomically into the grid's folder;
the CSV has the full-precision mean and std of every entry (table `gain`: the gains, and in
`published_top1` the paper's gain).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from ..io import atomic_write_text
from ..log import format_duration
from ..rundir import RunDir
from .grid import BENCH_RECORD, Cell, Grid, is_posthoc
from .runner import check_cell_config, own_training

METRICS = ("top1", "many", "medium", "few")
FOUR = ("top1", "many", "medium", "few", "rare")  # groups: four, the groups from `four_group`
TABLES = (("last", "Last epoch, test set"), ("best_val", "Best on validation, test set"),
          ("best_test", "Best test epoch of the test curve (diagnostic, never a selection)"),
          ("gain", "Gain over {baseline} (last epoch), beside the paper's own gain"))
LA_SUFFIX = " + post-hoc LA"
DLSA_SUFFIX = " + DLSA"
DLSA_RESULT = "dlsa/dlsa.json"  # below a cell's folder (benchmarks/full_protocol.sh)


@dataclass
class Entry:
    """One (table, row, ratio) of the results: per-seed values and their statistics."""

    table: str
    row: str
    method: str
    ratio: float
    seeds_total: int
    seeds: list[int]  # finished seeds whose files have this table's numbers
    finished: int  # finished cells (eval.json present), with or without this table's numbers
    values: dict[str, list]  # metric -> one value (or None for an empty group) per seed in `seeds`
    planned: bool = True  # False: the method does not run at this ratio
    published: float | None = None  # the paper's top-1 at this ratio (grid `published`); gain table: its gain

    def mean(self, metric: str) -> float | None:
        vals = [v for v in self.values[metric] if v is not None]
        return float(np.mean(vals)) if vals else None

    def std(self, metric: str) -> float | None:
        vals = [v for v in self.values[metric] if v is not None]
        return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None


def _metrics(grid: Grid) -> tuple[str, ...]:
    return FOUR if grid.groups == "four" else METRICS


def _values(m: dict, metrics: tuple[str, ...]) -> dict:
    """One eval.json (or its best_val) -> {metric: value}; the four groups from `four_group`."""
    groups = (m.get("four_group") or {}) if metrics == FOUR else m
    return {metric: m.get("top1") if metric == "top1" else groups.get(metric) for metric in metrics}


def _dlsa_as_eval(cell: Cell) -> dict | None:
    """A cell's dlsa.json in eval.json's shape: the last-epoch numbers at the top level, the
    validation-selected ones under `best_val` (module docstring); None when absent."""
    result = cell.run.read_optional_json(DLSA_RESULT)
    if result is None:
        return None
    last = (result.get("dlsa") or {}).get("last")
    if not isinstance(last, dict) or result.get("checkpoint") != "last":
        raise CheckpointError(f"{cell.dir / DLSA_RESULT} is not `longtail dlsa` on the cell's last checkpoint "
                              f"(checkpoint: {result.get('checkpoint')!r}); run `longtail dlsa {cell.dir} --out "
                              f"{cell.dir / 'dlsa'}` again")
    return {**last, "best_val": result.get("dlsa_val_selected")}


def _best_test_epoch(cell: Cell) -> dict | None:
    """The metrics.jsonl row with the highest `test_curve_top1` (train.test_curve_from), as an
    eval-like dict {top1, many, medium, few, epoch}; None without a test curve. The papers whose
    official code prints best_acc1 (LDAM-DRW) report this selection on the test set; the table
    shows it beside the honest ones to measure that part of a gap to a published number."""
    rows = [r for r in cell.run.read_metrics() if isinstance(r.get("test_curve_top1"), (int, float))]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["test_curve_top1"])  # the first of equal maxima
    return {"epoch": best["epoch"], "first_epoch": rows[0]["epoch"],
            **{k: best.get(f"test_curve_{k}") for k in METRICS}}


def _pretext_only(ev: dict | None) -> dict | None:
    """An eval-like dict of a pretext-task cell reduced to its top-1 (module docstring), its
    best-on-validation / best-test part likewise."""
    if ev is None:
        return None
    return {"top1": ev.get("top1"),
            **{k: _pretext_only(ev.get(k)) for k in ("best_val", "best_test") if ev.get(k) is not None}}


def _row_sources(name: str, cells: list[Cell]) -> dict[str, list[tuple[str, dict]]]:
    """Per table, the rows of one grid method and their numbers' source, {(ratio, seed): an
    eval-like dict, or None for an unfinished cell}: last epoch and best on validation from the
    cells' eval.json, plus the '+ post-hoc LA' and '+ DLSA' rows where any cell has their file;
    the best test epoch from the finished cells' test curves (a cell without one is left out of
    that table). Each file is read once."""
    def key(c: Cell) -> tuple:
        return (c.ratio, c.seed)

    evals = {key(c): c.run.read_optional_json(RunDir.EVAL) for c in cells}
    extra = ((name + LA_SUFFIX, {key(c): c.run.read_optional_json(RunDir.EVAL_LOGIT_ADJUSTED) for c in cells}),
             (name + DLSA_SUFFIX, {key(c): _dlsa_as_eval(c) for c in cells}))
    selected = [(name, evals)] + [(row, source) for row, source in extra
                                  if any(v is not None for v in source.values())]
    curves = {key(c): {"best_test": _best_test_epoch(c)} for c in cells if evals[key(c)] is not None}
    task = next((ev["task"] for ev in evals.values() if ev is not None and ev.get("task")), None)
    if task is not None:  # a pretext task: its own top-1, under a row name that says so
        row = f"{name} ({task} pre-training task)"
        selected = [(row, {k: _pretext_only(ev) for k, ev in evals.items()})]
        curves = {k: _pretext_only(ev) for k, ev in curves.items()}
        return {"last": selected, "best_val": selected, "best_test": [(row, curves)]}
    return {"last": selected, "best_val": selected, "best_test": [(name, curves)]}


def collect(grid: Grid) -> list[Entry]:
    """Every table entry of the grid, read from the cells' eval.json / eval_logit_adjusted.json /
    dlsa/dlsa.json / metrics.jsonl (`_row_sources`)."""
    metrics = _metrics(grid)
    rows = {spec.name: _row_sources(spec.name, grid.cells_of(spec.name)) for spec in grid.methods}
    entries = []
    for table in (t for t, _ in TABLES if t != "gain"):  # read from files; the gains derive from "last"
        for spec in grid.methods:
            for row, source in rows[spec.name][table]:
                for ratio in grid.ratios:
                    seeds, values, finished = [], {m: [] for m in metrics}, 0
                    for seed in grid.seeds:
                        ev = source.get((ratio, seed))
                        if ev is None:
                            continue
                        finished += 1
                        m = ev if table == "last" else ev.get(table)
                        if m is None:
                            continue
                        seeds.append(seed)
                        for metric, value in _values(m, metrics).items():
                            values[metric].append(value)
                    planned = spec.ratios is None or ratio in spec.ratios
                    published = spec.published.get(ratio) if row == spec.name else None
                    entries.append(Entry(table=table, row=row, method=spec.name, ratio=ratio,
                                         seeds_total=len(grid.seeds), seeds=seeds, finished=finished, values=values,
                                         planned=planned, published=published))
    return entries + _gains(grid, entries)


def _gains(grid: Grid, entries: list[Entry]) -> list[Entry]:
    """The gain table (module docstring): per last-epoch row but the baseline's own and a pretext
    task's, and per ratio, the per-seed differences row - baseline of the last-epoch numbers over
    the seeds both finished (None where either group is empty); `published` is the paper's gain
    where the method states both numbers (its own row only, not its '+ post-hoc LA' / '+ DLSA')."""
    if grid.baseline is None:
        return []
    base = {e.ratio: e for e in entries if e.table == "last" and e.row == grid.baseline}
    gains = []
    for e in entries:
        spec = grid.method(e.method)
        if e.table != "last" or e.row == grid.baseline or e.row not in (
                spec.name, spec.name + LA_SUFFIX, spec.name + DLSA_SUFFIX):
            continue
        b = base.get(e.ratio)
        if b is None:  # a baseline scored on a pretext task has no classification row to subtract
            continue
        seeds = [s for s in e.seeds if s in b.seeds]
        values = {m: [] for m in e.values}
        for seed in seeds:
            for m in values:
                x, y = e.values[m][e.seeds.index(seed)], b.values[m][b.seeds.index(seed)]
                values[m].append(None if x is None or y is None else x - y)
        paper = (spec.published[e.ratio] - spec.published_baseline[e.ratio]
                 if e.row == spec.name and e.ratio in spec.published_baseline else None)
        gains.append(Entry(table="gain", row=e.row, method=e.method, ratio=e.ratio, seeds_total=e.seeds_total,
                           seeds=seeds, finished=len(seeds), values=values, planned=e.planned and b.planned,
                           published=paper))
    return gains


def _number(value: float, table: str) -> str:
    """A table entry's value: two decimals, signed in the gain table."""
    return f"{value:+.2f}" if table == "gain" else f"{value:.2f}"


def _cell_text(e: Entry, metric: str) -> str:
    if not e.planned:
        return "not run"
    if e.finished == 0:
        return "pending"
    if not e.seeds:
        return "n/a"
    mean, std = e.mean(metric), e.std(metric)
    if mean is None:
        return "-"
    text = _number(mean, e.table) if std is None else f"{_number(mean, e.table)} ± {std:.2f}"
    if metric == "top1" and len(e.seeds) < e.seeds_total:
        text += f" [{len(e.seeds)}/{e.seeds_total}]"
    return text


def _training(grid: Grid, method: str) -> tuple[str, str]:
    """(training time, machines) of a method's finished cells: the seconds of the epochs each cell
    trained itself, over all its sessions (runner.own_training; a post-hoc cell: bench.json's
    wall_seconds), and the machines with their epochs."""
    seconds, counted, machines = 0.0, 0, {}
    for c in grid.cells_of(method):
        if not c.run.has(RunDir.EVAL):
            continue
        own, epochs = own_training(c)
        if not epochs:
            info = c.run.read_optional_json(BENCH_RECORD) or {}
            own = float(info["wall_seconds"]) if isinstance(info.get("wall_seconds"), (int, float)) else 0.0
        seconds += own
        counted += 1
        for label, n in epochs.items():
            machines[label] = machines.get(label, 0) + n
    if not counted:
        return "-", "-"
    where = "; ".join(f"{label} ({n} epochs)" for label, n in machines.items()) or "-"
    return f"{format_duration(seconds)} ({counted} cell{'s' if counted > 1 else ''})", where


def markdown(grid: Grid, entries: list[Entry]) -> str:
    """results.md: the paper-style tables and the cells they come from."""
    metrics = _metrics(grid)
    seeds = ", ".join(str(s) for s in grid.seeds)
    lines = [f"# {grid.name}", "",
             f"Grid `{grid.path}`, cells `{grid.out}/<method>/ratio<R>/seed<S>/`. Test-set accuracy (%): mean ± "
             f"sample standard deviation (ddof = 1) over seeds {seeds} ({', '.join(grid.seed_keys)}); one seed: "
             f"its value. Every number is read from the cells' {RunDir.EVAL} ({RunDir.EVAL_LOGIT_ADJUSTED} for "
             f"the '+ post-hoc LA' rows, {DLSA_RESULT} for the '+ DLSA' rows: DLSA on the cell's last-epoch "
             "features; best on validation: the DLSA depth and epoch chosen on validation). '-': empty shot "
             "group; 'pending': no finished cell; 'n/a': no best-on-validation numbers (post-hoc methods); "
             "'not run': a ratio the method does not run at; [k/n]: k of n seeds finished. A row '<method> "
             f"(<task> pre-training task)' is a pre-training cell scored on its pretext task ({RunDir.EVAL} `task`, "
             "e.g. SSP's 4-way rotation), not on the grid's classes: its top-1 only.", ""]
    papers = any(spec.published for spec in grid.methods)
    for table, title in TABLES:
        rows = [e for e in entries if e.table == table]
        if table != "last":
            if not any(e.seeds for e in rows):
                continue
            if table == "best_test":  # only the rows with a test curve
                rows = [e for e in rows if any(x.seeds for x in rows if x.row == e.row)]
        lines += [f"## {title.format(baseline=grid.baseline)}", ""]
        if table == "best_test":
            lines += ["The highest test top-1 over the epochs with a test curve (`train.test_curve_from`: each "
                      "epoch from then on is evaluated on the test set) and that epoch's shot groups, for the "
                      "cells that have one. The papers whose official code prints the best test epoch "
                      "(LDAM-DRW's `best_acc1`) report this selection; it is here to measure that part of the "
                      "gap to the published numbers, and nothing selects on it.", ""]
        if table == "gain":
            lines += [f"Each row's last-epoch top-1 and shot groups minus those of the {grid.baseline} cell of "
                      "the same ratio and seed, mean ± std over the seeds both finished. Paper: the paper's own "
                      f"gain, its published number minus the same table's {grid.baseline} number "
                      "(`published_baseline`). A gap to the published number that the gain does not show lies in "
                      f"what every row shares with {grid.baseline} (data, the papers' test-set selection, seed, "
                      "precision); a gap in the gain is the method's own.", ""]
        header = ["method"]
        for ratio in grid.ratios:
            header += [f"ratio {ratio:g} top-1", *(["paper"] if papers else []), *metrics[1:]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * (len(header) - 1))
        for row in dict.fromkeys(e.row for e in rows):
            cells = [row]
            for ratio in grid.ratios:
                e = next(x for x in rows if x.row == row and x.ratio == ratio)
                texts = [_cell_text(e, m) for m in metrics]
                if papers:
                    texts.insert(1, "" if e.published is None else _number(e.published, table))
                cells += texts
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if papers and table != "gain":
            lines += ["Paper: the published top-1 of the method at that ratio, from " + "; ".join(
                f"{spec.name}: {spec.published_source}" for spec in grid.methods if spec.published) + ".", ""]
    lines += ["## Cells", "", "Training time: the seconds of the epochs each finished cell trained itself "
              f"({RunDir.METRICS}, every session; a branch's shared prefix counts for its source; a post-hoc cell: "
              f"{BENCH_RECORD}'s wall_seconds). Machines: {RunDir.SESSIONS}, with the epochs each trained ('not "
              "recorded': epochs trained before runs recorded their machine).", "",
              "| method | config | stage 1 / branch | epochs | finished | training time | machines |",
              "|---|---|---|---:|---:|---:|---|"]
    for spec in grid.methods:
        cells = grid.cells_of(spec.name)
        done = sum(c.run.has(RunDir.EVAL) for c in cells)
        cfg = cells[0].cfg
        epochs = "post-hoc" if is_posthoc(cfg.method.name) else str(cfg.train.epochs)
        over = f" ({', '.join(spec.overrides)})" if spec.overrides else ""
        start = spec.stage1 or (f"{spec.branch_from} @ epoch {spec.branch_epoch}" if spec.branch_from else
                                f"weights of {spec.weights_from}" if spec.weights_from else "-")
        time_text, machines = _training(grid, spec.name)
        lines.append(f"| {spec.name} | `{spec.config}`{over} | {start} | {epochs} | "
                     f"{done}/{len(cells)} | {time_text} | {machines} |")
    lines.append("")
    return "\n".join(lines)


def csv_text(entries: list[Entry]) -> str:
    """results.csv: one line per (table, row, ratio); empty fields for '-', 'pending', 'n/a'."""
    metrics = tuple(entries[0].values) if entries else METRICS
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "imbalance_ratio", "seeds_finished", "seeds_total", "seeds",
                     *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "published_top1"])
    for e in entries:
        if (e.table != "last" and not e.seeds) or not e.planned:
            continue
        stats = []
        for m in metrics:
            mean, std = e.mean(m), e.std(m)
            stats += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        writer.writerow([e.table, e.row, f"{e.ratio:g}", len(e.seeds), e.seeds_total,
                         ";".join(str(s) for s in e.seeds), *stats,
                         "" if e.published is None else repr(e.published)])
    return buffer.getvalue()


def write_tables(grid: Grid) -> dict:
    """Write OUT/results.md and OUT/results.csv; returns {'markdown', 'csv', 'entries', 'text'}.

    Every existing cell folder must hold its cell's config (`check_cell_config`), so a table
    never mixes runs of another grid or other overrides."""
    for cell in grid.cells:
        check_cell_config(cell)
    entries = collect(grid)
    md, table_csv = markdown(grid, entries), csv_text(entries)
    atomic_write_text(grid.out / "results.md", md)
    atomic_write_text(grid.out / "results.csv", table_csv)
    return {"markdown": str(grid.out / "results.md"), "csv": str(grid.out / "results.csv"), "entries": entries,
            "text": md}

