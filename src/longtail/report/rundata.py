"""Read one run folder for the report: every number the report shows comes from here.

Read, never recomputed: `eval.json` (required: the last epoch's test metrics, and
`best_val` when present), `config.yaml`, `data.json`, `metrics.jsonl` (absent for
post-hoc methods), and the optional `eval_logit_adjusted.json` and `posthoc.json`; the
classifier's weight norms come from the run's feature cache (`features/last.npz`, written by
`longtail features` or `longtail analyze`) when it is fresh and the head is linear.
Nothing is trained or evaluated; a folder without eval.json is refused with a one-line
error naming the command that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.norms import cached_weight_norms
from ..errors import CheckpointError
from ..rundir import ARRAY_KEYS, RunDir

REQUIRED_EVAL_KEYS = ("top1", "many", "medium", "few", "per_class", "train_counts", "confusion", "reliability",
                      "ece", "groups", "thresholds")


@dataclass
class RunRecord:
    """The files of one run folder, as read (dicts and lists straight from JSON / YAML)."""

    path: Path
    label: str
    config: dict
    data: dict
    metrics: list[dict]
    eval: dict
    eval_logit_adjusted: dict | None = None
    posthoc: dict | None = None
    class_names: list[str] = field(default_factory=list)
    weight_norms: dict | None = None  # longtail.analysis.norms.cached_weight_norms

    @property
    def train_counts(self) -> list[int]:
        return [int(v) for v in self.eval["train_counts"]]


def _check_eval(ev: dict, name: str, run_dir: Path, *, arrays: bool = True) -> None:
    missing = [k for k in REQUIRED_EVAL_KEYS if k not in ev]
    if missing:
        raise CheckpointError(f"{name} in {run_dir} lacks {', '.join(repr(k) for k in missing)}: "
                              f"rerun `longtail eval {run_dir}`")
    if not arrays:
        return
    C = len(ev["train_counts"])
    rows = ev["confusion"].shape[0] if hasattr(ev["confusion"], "shape") else len(ev["confusion"])
    if len(ev["per_class"]) != C or rows != C:
        raise CheckpointError(f"{name} in {run_dir} is inconsistent: {C} training counts, "
                              f"{len(ev['per_class'])} per-class accuracies, {rows} confusion rows")


def load_run_record(run_dir: str | Path, *, label: str | None = None) -> RunRecord:
    """Read a run folder (see the module docstring); raises CheckpointError naming the file."""
    run = RunDir(run_dir).require()
    run_dir = run.path
    run.require_result(RunDir.EVAL)
    config = run.read_config_mapping()
    raw = run.read_eval(RunDir.EVAL)  # its scalars checked first; the arrays may live in eval_arrays.npz
    _check_eval({**dict.fromkeys(ARRAY_KEYS), **raw}, RunDir.EVAL, run_dir, arrays=False)
    ev = run.read_eval_full(RunDir.EVAL)
    _check_eval(ev, RunDir.EVAL, run_dir)
    if "best_val" in ev:
        _check_eval(ev["best_val"], f"{RunDir.EVAL} best_val", run_dir)
    data = run.read_optional_json(RunDir.DATA) or {}  # as written: the report reads old runs too
    la = run.read_eval_full(RunDir.EVAL_LOGIT_ADJUSTED) if run.has(RunDir.EVAL_LOGIT_ADJUSTED) else None
    if la is not None:
        _check_eval(la, RunDir.EVAL_LOGIT_ADJUSTED, run_dir)
    posthoc = run.read_optional_json(RunDir.POSTHOC)
    C = len(ev["train_counts"])
    names = ev.get("class_names") or data.get("class_names") or [str(i) for i in range(C)]
    if len(names) != C:
        raise CheckpointError(f"{RunDir.EVAL} in {run_dir} has {len(names)} class names for {C} classes")
    norms = cached_weight_norms(run_dir, config, posthoc=posthoc)
    if norms is not None and norms["train_counts"] != [int(v) for v in ev["train_counts"]]:
        norms = None  # a cache of other data than eval.json's
    return RunRecord(path=run_dir, label=label or run_dir.name, config=config, data=data,
                     metrics=run.read_metrics(), eval=ev, eval_logit_adjusted=la, posthoc=posthoc,
                     class_names=[str(n) for n in names], weight_norms=norms)


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Short unique labels: each path relative to the runs' deepest common folder.

    One run: its folder name. `bench/ce/ratio100/seed0` and `bench/focal/ratio100/seed0`
    become `ce/ratio100/seed0` and `focal/ratio100/seed0`.
    """
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return [paths[0].name or str(paths[0])]
    common = Path(*paths[0].parts[:1])
    for i in range(1, min(len(p.parts) for p in paths) + 1):
        prefix = paths[0].parts[:i]
        if all(p.parts[:i] == prefix for p in paths):
            common = Path(*prefix)
    labels = []
    for p in paths:
        rel = p.relative_to(common).as_posix() if p != common else p.name
        labels.append(rel or p.name)
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # the same folder given twice: number the repeats
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} ({seen[lab]})")
    return out
