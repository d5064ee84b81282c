"""`longtail analyze`: classifier weight norms (Table 2, Fig. 6), their tau-normalised
versions (Property 3) and t-SNE maps of test features (Fig. 5) for trained run folders.

Everything comes from `longtail.features.extract_features` (the run's network in eval mode
over its splits, cached in RUN_DIR/features/); the head weight of that cache is the run's
linear classifier. Every run is checked before anything is extracted, everything is
computed before anything is written, and each file is written atomically, so a bad input
leaves no output. Files in OUT:

    analysis.json                 per run: norms, their statistics, tau-normalised norms,
                                  t-SNE settings and silhouettes, wall times; a summary table
    weight_norms.png              raw norms of every run, head to tail (runs sharing their
                                  training counts; otherwise weight_norms_<run>.png each)
    weight_norms_tau_<run>.png    one run: raw norms and after each tau
    tsne_<run>.png                one run: t-SNE map of its test features
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..features import extract_features
from ..report.figures import weight_norms
from ..report.rundata import run_labels
from ..io import atomic_write_bytes, atomic_write_json
from ..rundir import RunDir
from .embedding import tsne_of_features
from .norms import check_linear_head, linear_head_problem, run_tau, weight_norm_report
from .plots import tsne_map


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _check_run(run_dir: Path, checkpoint: str) -> tuple[dict, dict | None]:
    """(config mapping, posthoc.json or None) of a run that has a linear class head."""
    run = RunDir(run_dir).require()
    config = run.read_config_mapping()
    problem = linear_head_problem(config)
    if problem is not None:
        raise ConfigError(f"cannot analyze {run_dir}: {problem}")
    run.require_checkpoint(checkpoint)
    return config, run.read_optional_json(RunDir.POSTHOC)


def _check_args(run_dirs, out: Path, checkpoint: str, taus, tsne_samples: int, perplexity: float) -> None:
    if not run_dirs:
        raise ConfigError("give at least one run folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    RunDir.check_which(checkpoint)
    for tau in taus:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
            raise ConfigError(f"--tau must be a finite number >= 0, got {tau!r}")
    if tsne_samples < 4:
        raise ConfigError(f"--tsne-samples must be >= 4, got {tsne_samples}")
    if not (math.isfinite(perplexity) and perplexity > 0):
        raise ConfigError(f"--perplexity must be > 0, got {perplexity}")


def analyze_runs(run_dirs: list[str | Path], out: str | Path, *, checkpoint: str = "last", taus=(),
                 tsne: bool = True, tsne_samples: int = 2000, seed: int = 0, perplexity: float = 30.0,
                 device: str | None = None) -> dict:
    """Analyze `run_dirs` into the folder `out` (module docstring); returns the analysis.json content.

    `taus`: tau values for tau-normalised norms, besides tau = 1 and a tau_norm run's own tau.
    """
    out = Path(out)
    _check_args(run_dirs, out, checkpoint, taus, tsne_samples, perplexity)
    paths = [Path(d) for d in run_dirs]
    checked = [_check_run(p, checkpoint) for p in paths]  # every run, before any extraction
    labels = run_labels(paths)
    runs, files = [], {}
    for path, label, (config, posthoc) in zip(paths, labels, checked, strict=True):
        tic = time.perf_counter()
        fs = extract_features(path, checkpoint=checkpoint, device=device)
        seconds = {"features": time.perf_counter() - tic, "features_from_cache": fs.from_cache}
        weight = check_linear_head(fs.head.get("weight"), fs.num_classes, path)
        own_tau = run_tau(config, posthoc)
        tau_list = list(dict.fromkeys([*([own_tau] if own_tau is not None else []), *map(float, taus), 1.0]))
        record = {"label": label, "run": str(path), "method": (config.get("method") or {}).get("name", "standard"),
                  "loss": (config.get("loss") or {}).get("name", "ce"), "checkpoint": checkpoint,
                  "epoch": fs.epoch, "num_classes": fs.num_classes, "class_names": list(fs.class_names),
                  "train_counts": [int(v) for v in fs.class_counts],
                  "head_to_tail": np.argsort(-fs.class_counts, kind="stable").tolist(),
                  "run_tau": own_tau, "weight_norms": weight_norm_report(weight, fs.class_counts, taus=tau_list),
                  "bias": fs.head["bias"].tolist() if "bias" in fs.head else None}
        slug = _slug(label)
        series = [("raw", record["weight_norms"]["l2"])]
        for t in record["weight_norms"]["tau_normalised"]:
            why = " (the run's tau)" if own_tau is not None and t["tau"] == own_tau else ""
            series.append((f"tau {t['tau']:g}{why}", t["l2"]))
        files[f"weight_norms_tau_{slug}.png"] = weight_norms(
            series=series, train_counts=record["train_counts"], class_names=record["class_names"],
            title=f"{label}: weight norms, raw and tau-normalised w / ||w||^tau")
        if tsne:
            test = fs["test"]
            t = tsne_of_features(test["features"], test["labels"], samples=tsne_samples, seed=seed,
                                 perplexity=perplexity)
            files[f"tsne_{slug}.png"] = tsne_map(
                coords=t["coords"], labels=t["labels"], class_names=record["class_names"],
                train_counts=record["train_counts"],
                title=f"{label}: t-SNE of {len(t['indices'])} test features (seed {seed})")
            seconds["tsne"] = t["seconds"]
            record["tsne"] = {"split": "test", "samples": len(t["indices"]), "seed": seed,
                              "perplexity": t["perplexity"], "kl_divergence": t["kl_divergence"],
                              "silhouette": t["silhouette"],
                              "silhouette_per_class": [t["silhouette_per_class"].get(c)
                                                       for c in range(fs.num_classes)],
                              "figure": f"tsne_{slug}.png"}
        record["seconds"] = seconds
        runs.append(record)
    counts = [r["train_counts"] for r in runs]
    if all(c == counts[0] for c in counts):
        files["weight_norms.png"] = weight_norms(
            series=[(r["label"], r["weight_norms"]["l2"]) for r in runs], train_counts=counts[0],
            class_names=runs[0]["class_names"], title="classifier weight norms, classes head to tail")
    else:
        for r in runs:
            files[f"weight_norms_{_slug(r['label'])}.png"] = weight_norms(
                series=[(r["label"], r["weight_norms"]["l2"])], train_counts=r["train_counts"],
                class_names=r["class_names"], title=f"{r['label']}: classifier weight norms")
    table = [{"label": r["label"], "variance": r["weight_norms"]["variance"], "cv": r["weight_norms"]["cv"],
              "max_over_min": r["weight_norms"]["max_over_min"],
              "spearman_vs_count": r["weight_norms"]["spearman_vs_count"],
              "silhouette": r.get("tsne", {}).get("silhouette"),
              **{f"variance_tau_{t['tau']:g}": t["variance"] for t in r["weight_norms"]["tau_normalised"]}}
             for r in runs]
    result = {"checkpoint": checkpoint,
              "variance": "population variance (ddof 0) of the per-class L2 norms ||w_c||_2 of the linear head",
              "tau_normalisation": "w_c / ||w_c||_2^tau (bias dropped), as TauNormLinear",
              "table": table, "runs": runs, "figures": sorted(files)}
    for name, png in files.items():
        atomic_write_bytes(out / name, png)
    atomic_write_json(out / "analysis.json", result)
    return result
