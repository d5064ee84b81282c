"""`longtail report`: run folders -> one self-contained HTML file.

For each run: what it is (data, model, method, loss, sampler, epochs, evaluated
checkpoints), its metrics (last epoch, best-on-validation, post-hoc logit adjustment, as
present), and six figures (each panel titled): the training-count histogram, per-class accuracy against class
frequency, many / medium / few bars, the confusion matrix ordered head to tail
(row-normalised), the reliability diagram with its ECE, and the training curves; a seventh,
the classifier's per-class weight norms, when the run's feature cache (`longtail features` /
`longtail analyze`) holds its linear head. With several runs, a comparison first: tables of
every run's numbers, the group bars side by side, every run's training curves overlaid and,
when the runs share their training counts, per-class accuracy overlaid.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_text
from ..rundir import RunDir
from . import figures
from .html import figure_html, page
from .rundata import RunRecord, load_run_record, run_labels
from .tables import comparison_table, config_rows, key_value_table, metric_rows, metrics_table

_READ = (RunDir.EVAL, RunDir.METRICS, RunDir.CONFIG, RunDir.DATA, RunDir.EVAL_LOGIT_ADJUSTED, RunDir.POSTHOC)
INTRO = (f"Every number and figure below is read from the run folders ({', '.join(_READ)}); nothing was "
         "retrained or re-evaluated. Test-set numbers are of the last epoch, and of the epoch with the best "
         "validation top-1 where a validation split exists: nothing is selected on the test set. Accuracies in %, "
         "'-' for an empty shot group, 'n/a' for a value that is undefined (a shot group whose classes have no "
         "test images).")


FIGURE_MAX_CLASSES = 100  # above: the confusion figure shows blocks of classes, head to tail


def _figure_confusion(confusion, train_counts, class_names) -> dict:
    """confusion_ordered's arguments: the dense matrix up to FIGURE_MAX_CLASSES classes; above, the
    classes ordered head to tail and cut into FIGURE_MAX_CLASSES equal blocks, each cell the summed
    counts of a block pair (a sparse product, never the dense C x C matrix)."""
    import numpy as np
    from scipy import sparse

    cm = confusion if sparse.issparse(confusion) else sparse.csr_matrix(np.asarray(confusion))
    C = cm.shape[0]
    if C <= FIGURE_MAX_CLASSES:
        return {"confusion": cm.toarray(), "train_counts": train_counts, "class_names": class_names}
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    block = np.empty(C, dtype=np.int64)
    block[order] = np.arange(C) * FIGURE_MAX_CLASSES // C
    P = sparse.csr_matrix((np.ones(C), (np.arange(C), block)), shape=(C, FIGURE_MAX_CLASSES))
    counts = np.bincount(block, weights=np.asarray(train_counts, dtype=float), minlength=FIGURE_MAX_CLASSES)
    names = [f"classes {i * C // FIGURE_MAX_CLASSES + 1}-{(i + 1) * C // FIGURE_MAX_CLASSES} (head to tail)"
             for i in range(FIGURE_MAX_CLASSES)]
    return {"confusion": (P.T @ cm @ P).toarray(), "train_counts": counts.tolist(), "class_names": names}


def _binned_note(num_classes: int) -> str:
    """Caption text of the per-class figures above rundir.INLINE_MAX_CLASSES classes (figures.binned)."""
    if not figures.many_classes(num_classes):
        return ""
    return (f"; classes head to tail in {min(figures.CLASS_BINS, num_classes)} equal bins: each point the bin's mean, "
            "the band its 25-75 % range (one point per class cannot be read at this many classes)")


def _run_section(rec: RunRecord, index: int) -> tuple[str, int]:
    ev = rec.eval
    out = [f'<section id="run-{index}"><h2>{escape(rec.label)}</h2>', key_value_table(config_rows(rec))]
    rows = metric_rows(rec)
    out.append(metrics_table(rows))
    out += [f'<p class="note">warning ({RunDir.EVAL}): {escape(w)}</p>' for w in ev.get("warnings", [])]
    shown = 0

    def add(png: bytes, caption: str, alt: str, name: str) -> None:
        nonlocal shown
        out.append(figure_html(png, caption=caption, alt=alt, name=name))
        shown += 1

    C = len(rec.train_counts)
    add(figures.count_histogram(train_counts=rec.train_counts, class_names=rec.class_names, groups=ev["groups"],
                                thresholds=ev["thresholds"]),
        f"Training images per class ({RunDir.EVAL} train_counts), head to tail, coloured by shot group; dashed line: "
        f"many threshold ({ev['thresholds']['many']}), dotted: few threshold ({ev['thresholds']['few']}).",
        "training-count histogram", "count_histogram")
    series = [(label, m["per_class"]) for label, m in rows]
    add(figures.accuracy_vs_frequency(series=series, train_counts=rec.train_counts, class_names=rec.class_names),
        f"Per-class test accuracy against the class's training count, {C} classes ({RunDir.EVAL} per_class)"
        f"{'; each point is named by its class (of the first series)' if C <= figures.MAX_CLASS_LABELS else ''}"
        f"{_binned_note(C)}.",
        "per-class accuracy against class frequency", "accuracy_vs_frequency")
    add(figures.group_bars(rows=rows),
        f"Overall top-1 and mean per-class accuracy of the many / medium / few groups ({RunDir.EVAL}).",
        "many / medium / few accuracy", "group_bars")
    add(figures.confusion_ordered(**_figure_confusion(ev["confusion"], rec.train_counts, rec.class_names)),
        f"Confusion matrix of the last epoch (after epoch {ev.get('epoch')}), rows = true class, each row divided "
        "by its test images; rows and columns ordered by training count, head (top / left) to tail. Tail images "
        "predicted as head classes appear left of the diagonal in the lower rows.",
        "confusion matrix ordered by class frequency", "confusion")
    add(figures.reliability_diagram(reliability=ev["reliability"], ece=float(ev["ece"])),
        f"Reliability diagram of the last epoch: test accuracy against top-1 confidence per equal-width bin "
        f"({RunDir.EVAL} reliability); ECE {ev['ece']:.4f}.", "reliability diagram", "reliability")
    if rec.weight_norms is not None:
        wn = rec.weight_norms
        series = [("raw", wn["l2"])]
        tau_text = ""
        if wn["tau"] is not None:
            series.append((f"tau {wn['tau']:g} ({RunDir.POSTHOC})", wn["tau_normalised"][0]["l2"]))
            tau_text = (f"; after tau-normalisation w / ||w||^{wn['tau']:g} the variance is "
                        f"{wn['tau_normalised'][0]['variance']:.4g}")
        ratio = "-" if wn["max_over_min"] is None else f"{wn['max_over_min']:.3g}"
        add(figures.weight_norms(series=series, train_counts=rec.train_counts, class_names=rec.class_names),
            f"L2 norm of each class's classifier weight, head to tail (from {RunDir.FEATURES}/last.npz): variance "
            f"{wn['variance']:.4g}, max / min {ratio}{tau_text} (docs/analysis.md){_binned_note(C)}.",
            "classifier weight norms, head to tail", "weight_norms")
    if rec.metrics:
        add(figures.training_curves(metrics=rec.metrics),
            f"Training curves from {RunDir.METRICS} ({len(rec.metrics)} epochs).", "training curves",
            "training_curves")
    else:
        out.append(f'<p class="note">No training curves: {RunDir.METRICS} is absent or empty '
                   "(a post-hoc method trains no epochs).</p>")
    out.append("</section>")
    return "\n".join(out), shown


def _comparison(records: list[RunRecord]) -> tuple[str, int]:
    out = ['<section id="comparison"><h2>Comparison</h2>', "<h3>Last epoch, test set</h3>",
           comparison_table(records, checkpoint="last")]
    if any("best_val" in r.eval for r in records):
        out += ["<h3>Best on validation, test set</h3>", comparison_table(records, checkpoint="best_val")]
    shown = 0
    rows = [(r.label, r.eval) for r in records]
    out.append(figure_html(figures.group_bars(rows=rows),
                           caption="Last epoch: overall top-1 and many / medium / few accuracy of every run.",
                           alt="many / medium / few accuracy of every run", name="compare_group_bars"))
    shown += 1
    if any(r.metrics for r in records):
        out.append(figure_html(
            figures.training_curves_overlay(runs=[(r.label, r.metrics) for r in records]),
            caption=f"Training curves of every run ({RunDir.METRICS}): training loss, and top-1 on the validation "
                    "split (solid) and the training batches (dashed); one colour per run.",
            alt="training curves of every run", name="compare_training_curves"))
        shown += 1
    first = records[0]
    if all(r.train_counts == first.train_counts for r in records):
        series = [(r.label, r.eval["per_class"]) for r in records]
        out.append(figure_html(
            figures.accuracy_vs_frequency(series=series, train_counts=first.train_counts,
                                          class_names=first.class_names),
            caption=f"Last epoch: per-class test accuracy against training count, every run{_binned_note(len(first.train_counts))}.",
            alt="per-class accuracy of every run", name="compare_accuracy_vs_frequency"))
        shown += 1
    else:
        out.append('<p class="note">The runs have different training counts, so per-class accuracy is shown '
                   "per run only.</p>")
    out.append("</section>")
    return "\n".join(out), shown


def build_report(run_dirs: list[str | Path], out: str | Path, *, title: str | None = None) -> dict:
    """Write the report of `run_dirs` to `out` (atomically); returns {'out', 'runs', 'figures', 'bytes'}."""
    if not run_dirs:
        raise ConfigError("give at least one run folder")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as report.html")
    records = [load_run_record(d, label=lab) for d, lab in zip(run_dirs, run_labels(run_dirs), strict=True)]
    title = title or ("longtail report: " + (records[0].label if len(records) == 1 else f"{len(records)} runs"))
    body = [f"<h1>{escape(title)}</h1>", f'<p class="note">{escape(INTRO)}</p>']
    if len(records) > 1:
        links = "".join(f'<a href="#run-{i}">{escape(r.label)}</a>' for i, r in enumerate(records))
        body.append(f'<nav><a href="#comparison">comparison</a>{links}</nav>')
    total = 0
    if len(records) > 1:
        html, shown = _comparison(records)
        body.append(html)
        total += shown
    for i, rec in enumerate(records):
        html, shown = _run_section(rec, i)
        body.append(html)
        total += shown
    text = page(title=title, body=body)
    atomic_write_text(out, text)
    return {"out": str(out), "runs": len(records), "figures": total, "bytes": len(text.encode())}
