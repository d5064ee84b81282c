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

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.norms import cached_weight_norms
from ..config import read_yaml
from ..errors import CheckpointError, ConfigError
from ..train.loop import read_metrics

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


def _read_json(path: Path, run_dir: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path.name} in {run_dir} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name} in {run_dir} must hold a JSON object")
    return value


def _check_eval(ev: dict, name: str, run_dir: Path) -> None:
    missing = [k for k in REQUIRED_EVAL_KEYS if k not in ev]
    if missing:
        raise CheckpointError(f"{name} in {run_dir} lacks {', '.join(repr(k) for k in missing)}: "
                              f"rerun `longtail eval {run_dir}`")
    C = len(ev["train_counts"])
    if len(ev["per_class"]) != C or len(ev["confusion"]) != C:
        raise CheckpointError(f"{name} in {run_dir} is inconsistent: {C} training counts, "
                              f"{len(ev['per_class'])} per-class accuracies, {len(ev['confusion'])} confusion rows")


def load_run_record(run_dir: str | Path, *, label: str | None = None) -> RunRecord:
    """Read a run folder (see the module docstring); raises CheckpointError naming the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"not a run folder (no config.yaml): {run_dir}")
    if not (run_dir / "eval.json").is_file():
        raise CheckpointError(f"no eval.json in {run_dir}: run `longtail eval {run_dir}` first")
    try:
        config = read_yaml(run_dir / "config.yaml")
    except ConfigError as err:  # reworded as a run-folder problem
        raise CheckpointError(f"config.yaml in {run_dir} cannot be read: {str(err).splitlines()[0]}") from None
    ev = _read_json(run_dir / "eval.json", run_dir)
    _check_eval(ev, "eval.json", run_dir)
    if "best_val" in ev:
        _check_eval(ev["best_val"], "eval.json best_val", run_dir)
    data = _read_json(run_dir / "data.json", run_dir) if (run_dir / "data.json").is_file() else {}
    la = None
    if (run_dir / "eval_logit_adjusted.json").is_file():
        la = _read_json(run_dir / "eval_logit_adjusted.json", run_dir)
        _check_eval(la, "eval_logit_adjusted.json", run_dir)
    posthoc = _read_json(run_dir / "posthoc.json", run_dir) if (run_dir / "posthoc.json").is_file() else None
    C = len(ev["train_counts"])
    names = ev.get("class_names") or data.get("class_names") or [str(i) for i in range(C)]
    if len(names) != C:
        raise CheckpointError(f"eval.json in {run_dir} has {len(names)} class names for {C} classes")
    norms = cached_weight_norms(run_dir, config, posthoc=posthoc)
    if norms is not None and norms["train_counts"] != [int(v) for v in ev["train_counts"]]:
        norms = None  # a cache of other data than eval.json's
    return RunRecord(path=run_dir, label=label or run_dir.name, config=config, data=data,
                     metrics=read_metrics(run_dir), eval=ev, eval_logit_adjusted=la, posthoc=posthoc,
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
