"""`longtail similarity RUN_DIR`: the category similarity a trained run models (seed 001).

From the run's frozen features (`features.extract_features`, its last or best-val
checkpoint): class prototypes of the training images, their 1-D t-SNE projection, the class
order and similarity windows, the SWR weights (Eq. 2) and SWM margins (Eq. 3), the
class-balanced weights beside them (Fig. 2), and the confusable head-to-tail pairs of its
test predictions (Table 1), optionally with other runs' errors for the same pairs.

Output folder (written atomically, file by file): RUN_DIR/similarity by default; with
`--out DIR` (outside RUN_DIR) nothing is written into RUN_DIR: the features cache goes to
DIR/features/ instead of RUN_DIR/features/ (a fresh cache already in RUN_DIR/features/ is
read, not rewritten).

    similarity.json   settings, projection, order, windows, weights, margins, CB weights,
                      similarity matrix, confusable pairs; above rundir.INLINE_MAX_CLASSES
                      classes only the settings, the confusable pairs and `"arrays"`:
    similarity_arrays.npz   (above INLINE_MAX_CLASSES classes, compressed) class_names,
                      class_counts, projection, order, swr_weights, swm_margins, cb_weights,
                      window_members (C, W) int32 (-1 pads a truncated window) and
                      window_similarity (C, W) float32, sim(i, c) of each window pair: the
                      C x C similarity matrix is never built (only the window pairs enter Eq. 3)
    classes.csv       one row per class, in projection order
    confusable.csv / confusable.json   the head-to-tail table
    weights.png       SWR vs class-balanced weights per class, head to tail
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..rundir import CHECKPOINT_CHOICES, INLINE_MAX_CLASSES, RunDir

DEFAULT_WINDOW, DEFAULT_BETA, DEFAULT_EDGE = 15, 1.0, "shift"
ARRAYS = "similarity_arrays.npz"  # above INLINE_MAX_CLASSES classes, beside similarity.json


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _run_settings(run_dir: Path) -> tuple[dict, int]:
    """(the run's SWRM loss params or {}, train.seed) from its config."""
    cfg = RunDir(run_dir).read_config()
    return (dict(cfg.loss.params) if cfg.loss.name == "swrm" else {}), cfg.train.seed


def _other_confusion(run_dir: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    from .confusion import confusion_counts

    run = RunDir(run_dir)
    preds = run.read_predictions()
    logits, other_labels = run.read_logits(what="longtail similarity --compare", preds=preds), preds["labels"]
    if logits.shape[1] != num_classes or not np.array_equal(other_labels, labels):
        raise ConfigError(f"{run_dir} was not evaluated on the same test set ({logits.shape[1]} classes, "
                          f"{len(other_labels)} test images)")
    return confusion_counts(logits, other_labels, num_classes)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def analyse_run(run_dir: str | Path, *, out: str | Path | None = None, checkpoint: str = "last",
                device: str | None = None, window: int | None = None, beta: float | None = None,
                edge: str | None = None, similarity: str = "projection", perplexity: float | None = None,
                seed: int | None = None, tail_fraction: float = 0.5, min_ratio: float = 2.0, top: int = 2,
                cb_beta: float = 0.9999, compare: list[str] | None = None, refresh: bool = False) -> dict:
    """Compute and write everything of the module docstring; returns the similarity.json content."""
    import torch

    from ..features import extract_features
    from ..losses import effective_number_weights
    from ..io import atomic_write_json, atomic_write_text
    from .confusion import compare_errors, confusion_counts, head_to_tail_errors
    from .plot import plot_weights
    from .projection import default_perplexity, prototypes_from_features, tsne_projection
    from .windows import (SIMILARITIES, cosine_similarity_from_prototypes, cosine_similarity_of,
                          projection_similarity, projection_similarity_of, swm_margins, swm_margins_banded,
                          swr_weights, swr_weights_banded, window_mask, window_members, window_table)

    run = RunDir(run_dir).require()
    run_dir = run.path
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if not 0 <= cb_beta < 1:
        raise ConfigError(f"cb_beta must be in [0, 1), got {cb_beta}")
    loss_params, run_seed = _run_settings(run_dir)
    window = int(loss_params.get("window", DEFAULT_WINDOW)) if window is None else window
    beta = float(loss_params.get("beta", DEFAULT_BETA)) if beta is None else beta
    edge = loss_params.get("edge", DEFAULT_EDGE) if edge is None else edge
    seed = run_seed if seed is None else seed
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}")
    if not np.isfinite(beta) or beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    compare = [Path(c) for c in (compare or [])]
    for other in compare:
        RunDir(other).require_result(RunDir.PREDICTIONS)
    out = run_dir / "similarity" if out is None else Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")

    run.require_checkpoint(checkpoint)

    started = time.time()
    created = not out.exists()
    try:
        cache_dir = None if _is_inside(out, run_dir) else out / RunDir.FEATURES
        fs = extract_features(run_dir, checkpoint=checkpoint, device=device, refresh=refresh, cache_dir=cache_dir)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    feature_seconds = time.time() - started
    C, names, counts = fs.num_classes, fs.class_names, fs.class_counts

    tic = time.time()
    protos = prototypes_from_features(fs["train"]["features"], fs["train"]["labels"], C)
    projection = tsne_projection(protos, seed=seed, perplexity=perplexity)
    tsne_seconds = time.time() - tic
    order = np.argsort(projection, kind="stable")
    members = window_members(order, window, edge)
    many = C > INLINE_MAX_CLASSES
    if many:  # banded: C x W window pairs, never a C x C matrix
        table, valid = window_table(order, window, edge)
        sim_of = cosine_similarity_of(protos) if similarity == "cosine" else projection_similarity_of(projection)
        weights = swr_weights_banded(counts, table, valid)
        margins = swm_margins_banded(sim_of, table, valid, beta)
        window_sim = np.where(valid, sim_of(np.arange(C)[:, None], table), np.nan).astype(np.float32)
    else:
        mask = window_mask(order, window, edge)
        sim = (cosine_similarity_from_prototypes(protos) if similarity == "cosine"
               else projection_similarity(torch.from_numpy(projection)))
        weights = swr_weights(counts, mask).numpy()
        margins = swm_margins(sim, mask, beta).numpy()
    cb = effective_number_weights(counts, cb_beta).double().numpy()

    test = fs["test"]
    cm = confusion_counts(test["logits"], test["labels"], C)
    diagonal, support = np.asarray(cm.diagonal()), np.asarray(cm.sum(axis=1)).ravel()
    rows = head_to_tail_errors(cm, counts, names, tail_fraction=tail_fraction, min_ratio=min_ratio, top=top)
    compare_names = []
    for other in compare:
        name = other.name or str(other)
        rows = compare_errors(rows, _other_confusion(other, test["labels"], C), name)
        compare_names.append(name)

    position = np.empty(C, dtype=np.int64)
    position[order] = np.arange(C)
    classes = [{"position": int(position[c]), "class": names[c], "index": c, "train_count": int(counts[c]),
                "projection": round(float(projection[c]), 6),
                "window": " ".join(names[i] for i in members[c]),
                "swr_weight": round(float(weights[c]), 6), "swm_margin": round(float(margins[c]), 6),
                "cb_weight": round(float(cb[c]), 6),
                "test_accuracy": round(100.0 * diagonal[c] / max(int(support[c]), 1), 4)}
               for c in order.tolist()]
    result = {
        "run": str(run_dir), "checkpoint": checkpoint, "epoch": fs.epoch,
        "settings": {"window": window, "effective_window": min(window, C), "beta": beta, "edge": edge,
                     "similarity": similarity, "tsne_seed": seed,
                     "perplexity": default_perplexity(C) if perplexity is None else perplexity,
                     "cb_beta": cb_beta, "tail_fraction": tail_fraction, "min_ratio": min_ratio, "top": top},
        "class_names": list(names), "class_counts": [int(v) for v in counts],
        "projection": [float(v) for v in projection], "order": [names[i] for i in order],
        "windows": {names[c]: [names[i] for i in members[c]] for c in range(C)},
        "swr_weights": [float(v) for v in weights], "swm_margins": [float(v) for v in margins],
        "cb_weights": [float(v) for v in cb],
        "similarity": None if many else sim.double().numpy().round(6).tolist(),
        "confusable": rows, "compared_with": [str(c) for c in compare],
        "seconds": {"features": round(feature_seconds, 2), "tsne": round(tsne_seconds, 3)},
    }
    if many:  # the per-class lists go to the npz; similarity.json keeps what a reader scans
        result = _small_result(result)
        _write_arrays(out / ARRAYS, names=names, counts=counts, projection=projection, order=order,
                      weights=weights, margins=margins, cb=cb,
                      table=np.where(valid, table, -1), window_sim=window_sim)
    atomic_write_text(out / "classes.csv", _csv(classes))
    atomic_write_text(out / "confusable.csv", _csv(rows))
    atomic_write_json(out / "confusable.json", rows)
    plot_weights(weights, cb, counts, names, out / "weights.png",
                 title=f"{run_dir.name}: SWR (W={min(window, C)}) vs class-balanced (beta={cb_beta:g}) weights")
    atomic_write_json(out / "similarity.json", result)
    result["_classes"], result["_compare_names"], result["out"] = classes, compare_names, str(out)
    return result


PER_CLASS_KEYS = ("class_names", "class_counts", "projection", "order", "windows", "swr_weights", "swm_margins",
                  "cb_weights", "similarity")


def _small_result(result: dict) -> dict:
    """similarity.json above INLINE_MAX_CLASSES classes: the per-class keys replaced by `arrays`."""
    small = {k: v for k, v in result.items() if k not in PER_CLASS_KEYS}
    small["num_classes"] = len(result["class_names"])
    small["arrays"] = ARRAYS
    return small


def _write_arrays(path: Path, *, names, counts, projection, order, weights, margins, cb, table, window_sim) -> None:
    """similarity_arrays.npz (module docstring), compressed, written atomically."""
    from ..io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, class_names=np.asarray(names, dtype=str), class_counts=np.asarray(counts, np.int64),
                        projection=np.asarray(projection, np.float64), order=np.asarray(order, np.int32),
                        swr_weights=np.asarray(weights, np.float64), swm_margins=np.asarray(margins, np.float64),
                        cb_weights=np.asarray(cb, np.float64), window_members=np.asarray(table, np.int32),
                        window_similarity=window_sim)
    atomic_write_bytes(path, buffer.getvalue())


def format_classes(classes: list[dict]) -> str:
    width = max(len(r["class"]) for r in classes) + 2
    lines = [f"{'pos':>4}  {'class':<{width}}{'n':>7}{'proj':>10}{'SWR w':>8}{'SWM m':>8}{'CB w':>8}  window"]
    for r in classes:
        lines.append(f"{r['position']:>4}  {r['class']:<{width}}{r['train_count']:>7}{r['projection']:>10.2f}"
                     f"{r['swr_weight']:>8.3f}{r['swm_margin']:>8.3f}{r['cb_weight']:>8.3f}  {r['window']}")
    return "\n".join(lines)


def _cmd_similarity(args) -> int:
    from ..runlock import lock_if_inside
    from .confusion import format_table

    with lock_if_inside(args.out or Path(args.run_dir) / "similarity", args.run_dir):  # one writer per run folder
        result = analyse_run(args.run_dir, out=args.out, checkpoint=args.checkpoint, device=args.device,
                             window=args.window, beta=args.beta, edge=args.edge, similarity=args.similarity,
                             perplexity=args.perplexity, seed=args.seed, tail_fraction=args.tail_fraction,
                             min_ratio=args.min_ratio, top=args.top, cb_beta=args.cb_beta, compare=args.compare,
                             refresh=args.refresh)
    s = result["settings"]
    print(f"{result['run']} ({result['checkpoint']}, epoch {result['epoch']}): t-SNE order, windows of "
          f"W={s['effective_window']} ({s['edge']}), beta {s['beta']:g}, similarity {s['similarity']}")
    shown = result["_classes"][:INLINE_MAX_CLASSES]
    print(format_classes(shown))
    if len(result["_classes"]) > len(shown):
        print(f"  ... {len(result['_classes']) - len(shown)} more classes in classes.csv")
    print("\nconfusable head-to-tail pairs (test set):")
    print(format_table(result["confusable"], compare=result["_compare_names"]))
    sec = result["seconds"]
    arrays = f"{ARRAYS}, " if "arrays" in result else ""
    print(f"\nfeatures {sec['features']:.1f}s, t-SNE {sec['tsne']:.2f}s; wrote {result['out']}/similarity.json, "
          f"{arrays}classes.csv, confusable.csv, confusable.json, weights.png")
    return 0


def register(sub) -> None:
    p = sub.add_parser("similarity", help="category similarity of a trained run (SWRM): t-SNE class order, "
                                          "windows, SWR weights, SWM margins, confusable head-to-tail pairs")
    p.add_argument("run_dir", help="a trained run folder (any method; usually plain CE)")
    p.add_argument("--out", help="output folder (default RUN_DIR/similarity); outside RUN_DIR, nothing is "
                                 "written into RUN_DIR, the features cache included")
    p.add_argument("--checkpoint", choices=sorted(CHECKPOINT_CHOICES), default="last")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    p.add_argument("--refresh", action="store_true", help="extract the features again even when a cache is fresh")
    p.add_argument("--window", type=int, help="window size W (default: the run's swrm loss setting, else 15)")
    p.add_argument("--beta", type=float, help="SWM beta (default: the run's swrm loss setting, else 1)")
    p.add_argument("--edge", choices=("shift", "truncate"), help="windows at the ends of the order (default shift)")
    p.add_argument("--similarity", choices=("projection", "cosine"), default="projection",
                   help="sim(i, c) in Eq. 3: from the projection (default) or prototype cosine")
    p.add_argument("--perplexity", type=float, help="t-SNE perplexity (default min(30, max(1, (C-1)/3)))")
    p.add_argument("--seed", type=int, help="t-SNE seed (default: the run's train.seed)")
    p.add_argument("--tail-fraction", type=float, default=0.5, help="the rarest fraction of classes taken as tails")
    p.add_argument("--min-ratio", type=float, default=2.0, help="a head has >= this times the tail's count")
    p.add_argument("--top", type=int, default=2, help="heads listed per tail class")
    p.add_argument("--cb-beta", type=float, default=0.9999, help="beta of the class-balanced weights (Fig. 2)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="other runs (same test set) whose errors are "
                                                               "listed for the same pairs (e.g. an SWRM run)")
    p.set_defaults(func=_cmd_similarity)
