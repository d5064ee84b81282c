"""The report's figures, each a function of numbers read from run files -> PNG bytes.

Drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot state, no display).
Classes are always ordered head to tail (training count descending, ties in class-index
order), and coloured by their shot group as `eval.json` gives it (`groups`), so the
figures agree with the many / medium / few numbers beside them.
"""

from __future__ import annotations

import io
import math

import numpy as np

from ..doctor.plot import GROUP_COLOURS

RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
MAX_CLASS_LABELS = 40  # above this, axes show class ranks instead of names
CLASS_BINS = 50  # above rundir.INLINE_MAX_CLASSES classes, per-class curves are binned into this many


def binned(order: np.ndarray, count: int = CLASS_BINS) -> list[np.ndarray]:
    """`order` (classes head to tail) cut into `count` consecutive bins of (near) equal size."""
    return [b for b in np.array_split(np.asarray(order), min(count, len(order))) if len(b)]


def many_classes(num_classes: int) -> bool:
    """Per-class curves are summarised by bins above rundir.INLINE_MAX_CLASSES classes (eval.json's
    threshold): one point per class cannot be read there."""
    from ..rundir import INLINE_MAX_CLASSES

    return num_classes > INLINE_MAX_CLASSES


def _bin_summary(values: np.ndarray, bins: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kept bin positions, mean, 25th, 75th percentile) of the defined (finite) values per bin."""
    keep, mean, low, high = [], [], [], []
    for k, b in enumerate(bins):
        v = values[b]
        v = v[np.isfinite(v)]
        if len(v):
            keep.append(k)
            mean.append(v.mean())
            low.append(np.percentile(v, 25))
            high.append(np.percentile(v, 75))
    return np.asarray(keep, dtype=np.int64), np.asarray(mean), np.asarray(low), np.asarray(high)


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def head_to_tail(train_counts) -> np.ndarray:
    """Class indices sorted by training count, descending; ties keep class order."""
    return np.argsort(-np.asarray(train_counts), kind="stable")


def _group_of(groups: dict, num_classes: int) -> list[str]:
    out = ["medium"] * num_classes
    for g, idx in groups.items():
        for i in idx:
            if g in GROUP_COLOURS and 0 <= int(i) < num_classes:
                out[int(i)] = g
    return out


def _class_ticks(ax, axis: str, order, class_names, *, rotate: bool) -> None:
    C = len(order)
    if C > MAX_CLASS_LABELS:
        getattr(ax, f"set_{axis}label")("class rank, head to tail")
        return
    ticks = np.arange(C)
    getattr(ax, f"set_{axis}ticks")(ticks)
    labels = [class_names[i] for i in order]
    if axis == "x":
        ax.set_xticklabels(labels, rotation=60 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    else:
        ax.set_yticklabels(labels, fontsize=8)


def _crowded(class_names, num_classes: int) -> bool:
    """Tilt class-name tick labels when they would overlap side by side."""
    return num_classes > 10 or max((len(str(n)) for n in class_names), default=0) * num_classes > 50


def count_histogram(*, train_counts, class_names, groups: dict, thresholds: dict) -> bytes:
    """Training images per class, head to tail, coloured by shot group; dashed group boundaries."""
    from matplotlib.patches import Patch

    counts = np.asarray(train_counts)
    C = len(counts)
    order = head_to_tail(counts)
    group = _group_of(groups, C)
    fig = new_figure(min(14.0, max(6.0, 0.2 * C + 2.5)), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(C), counts[order], width=0.9 if C <= 200 else 1.0,
           color=[GROUP_COLOURS[group[i]] for i in order], linewidth=0)
    ax.axhline(thresholds["many"], color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(thresholds["few"], color="grey", linestyle=":", linewidth=0.8)
    if counts.min() > 0 and counts.max() / counts.min() > 20:
        ax.set_yscale("log")
    _class_ticks(ax, "x", order, class_names, rotate=_crowded(class_names, C))
    ax.set_ylabel("training images")
    sizes = {g: sum(1 for x in group if x == g) for g in GROUP_COLOURS}
    ax.legend(handles=[Patch(color=GROUP_COLOURS[g], label=f"{g} ({sizes[g]})") for g in GROUP_COLOURS],
              fontsize=8, frameon=False, loc="upper right")
    ratio = f", imbalance ratio {counts.max() / counts.min():.1f}" if counts.min() > 0 else ""
    ax.set_title(f"{int(counts.sum())} training images, {C} classes{ratio}", fontsize=10)
    return png_bytes(fig)


def accuracy_vs_frequency(*, series: list[tuple[str, list]], train_counts, class_names) -> bytes:
    """Per-class test accuracy (%) against the class's training count (log axis).

    `series`: (label, per_class accuracies) per run or checkpoint; None entries (classes
    without test images) are left out. Points of a series are joined head to tail.
    """
    counts = np.asarray(train_counts, dtype=float)
    order = head_to_tail(counts)
    C = len(counts)
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    bins = binned(order) if many_classes(C) else None
    for k, (label, per_class) in enumerate(series):
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        if bins is not None:  # mean and interquartile band of each bin of classes, head to tail
            acc = np.array([np.nan if v is None else v for v in per_class], dtype=float)
            keep, mean, low, high = _bin_summary(acc, bins)
            xs = np.array([np.median(counts[bins[j]]) for j in keep])
            ax.plot(xs, mean, marker="o", markersize=3, linewidth=1.0, color=colour,
                    label=label if len(xs) else f"{label} (no class with test images)")
            ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
            continue
        xs = [counts[i] for i in order if per_class[i] is not None]
        ys = [per_class[i] for i in order if per_class[i] is not None]
        ax.plot(xs, ys, marker="o", markersize=4 if C <= 100 else 2, linewidth=0.8, alpha=0.85, color=colour,
                label=label if xs else f"{label} (no class with test images)")
    if counts.min() > 0 and counts.max() > counts.min():
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        if counts.max() / counts.min() < 30:  # under ~1.5 decades: label 2, 3, 5 times the powers of ten too
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-3, 103)
    if C <= MAX_CLASS_LABELS and series:
        _label_points(ax, [(class_names[i], counts[i], series[0][1][i]) for i in order
                           if series[0][1][i] is not None])
    if bins is not None:
        ax.set_xlabel(f"training images (median of each of {len(bins)} bins of ~{C // len(bins)} classes, "
                      "head to tail)")
        ax.set_ylabel("test accuracy (%): bin mean, 25-75 % band")
    else:
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy of the class (%)")
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or (series and series[0][0]):
        ax.legend(fontsize=8, frameon=False, loc="best")
    return png_bytes(fig)


def _label_points(ax, points: list[tuple[str, float, float]]) -> None:
    """One name beside every point; a label that would overlap one placed before moves up a line
    (points of equal count and near-equal accuracy are common: profile none, ties)."""
    ax.figure.canvas.draw_idle()
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading display positions
    placed: list[tuple[float, float]] = []
    for name, x, y in points:
        px, py = ax.transData.transform((x, y))
        scale = ax.figure.dpi / 72  # points -> pixels
        for dy in (3, -11, 12, -20, 21, -29, 30, -38, 39):  # above, below, further out
            if not any(abs(px - qx) < 6 * scale * max(len(str(name)), 2) and abs(py + dy * scale - qy) < 9 * scale
                       for qx, qy in placed):
                break
        placed.append((px, py + dy * scale))
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7, color="#444444",
                    arrowprops=dict(arrowstyle="-", color="#999999", linewidth=0.5) if dy != 3 else None)


GROUP_BAR_KEYS = ("top1", "many", "medium", "few")


def group_bars(*, rows: list[tuple[str, dict]]) -> bytes:
    """Overall top-1 and many / medium / few accuracy (%), one bar per row in each group.

    `rows`: (label, metrics dict with top1 / many / medium / few); a null group is marked
    'empty' instead of a bar, or 'n/a' when it has classes but none with test images (or
    holds a NaN from an older eval.json).
    """
    fig = new_figure(max(6.0, 1.2 + 0.55 * len(rows) * len(GROUP_BAR_KEYS)), 3.8 + 0.25 * ((len(rows) + 2) // 3))
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(rows), 1)
    width = 0.8 / n
    for k, (label, m) in enumerate(rows):
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        labelled = False
        for j, key in enumerate(GROUP_BAR_KEYS):
            x = j - 0.4 + width * (k + 0.5)
            value = m.get(key)
            if value is None or not np.isfinite(value):
                undefined = value is not None or (m.get("groups") or {}).get(key)
                ax.text(x, 1, "n/a" if undefined else "empty", rotation=90 if n > 2 else 0, ha="center",
                        va="bottom", fontsize=8, color="grey")
                continue
            ax.bar(x, value, width=width * 0.95, color=colour, label=None if labelled else label)
            labelled = True
            if n <= 6:
                ax.text(x, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
        if not labelled:  # no group has a value: the run still gets its legend entry
            ax.bar([], [], color=colour, label=label)
    ax.set_xticks(np.arange(len(GROUP_BAR_KEYS)))
    ax.set_xticklabels(["overall", "many", "medium", "few"])
    ax.set_ylim(0, 110)
    ax.set_ylabel("test accuracy (%)")
    if len(rows) > 1:
        ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  ncol=min(len(rows), 3))
    return png_bytes(fig)


def ordered_confusion(confusion, train_counts) -> tuple[np.ndarray, np.ndarray]:
    """(order, matrix): classes head to tail, the confusion matrix permuted to that order on
    both axes and each row divided by its sum (a row without test images stays zero)."""
    cm = np.asarray(confusion, dtype=float)
    order = head_to_tail(train_counts)
    cm = cm[np.ix_(order, order)]
    rows = cm.sum(axis=1, keepdims=True)
    return order, np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def confusion_ordered(*, confusion, train_counts, class_names) -> bytes:
    """Row-normalised confusion matrix, rows and columns head to tail.

    Row i is the distribution of predictions for true class i, so the mass below the
    diagonal's right side (columns of larger classes, to the left) is tail images
    predicted as head classes.
    """
    order, norm = ordered_confusion(confusion, train_counts)
    rows = np.asarray(confusion, dtype=float).sum(axis=1)[order]
    C = len(order)
    side = min(10.0, max(4.5, 0.3 * C + 2.0))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's test images")
    if C <= 12:
        for i in range(C):
            for j in range(C):
                if rows[i] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    _class_ticks(ax, "x", order, class_names, rotate=_crowded(class_names, C))
    _class_ticks(ax, "y", order, class_names, rotate=False)
    if C <= MAX_CLASS_LABELS:
        ax.set_xlabel("predicted class (head to tail)")
        ax.set_ylabel("true class (head to tail)")
    else:
        ax.set_xlabel("predicted class rank (head to tail)")
        ax.set_ylabel("true class rank (head to tail)")
    return png_bytes(fig)


def reliability_diagram(*, reliability: dict, ece: float) -> bytes:
    """Accuracy against confidence per equal-width bin (empty bins left out), with the ECE.

    Bars at the bins' accuracy, the gap to their mean confidence shaded, the diagonal of
    perfect calibration, and the share of test images per bin below.
    """
    count = np.asarray(reliability["bin_count"], dtype=float)
    acc = np.asarray(reliability["bin_accuracy"], dtype=float)
    conf = np.asarray(reliability["bin_confidence"], dtype=float)
    bins = len(count)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / bins
    used = count > 0
    fig = new_figure(5.2, 5.6)
    grid = fig.add_gridspec(4, 1)
    ax = fig.add_subplot(grid[:3, 0])
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect calibration")
    ax.bar(centres[used], acc[used], width=width * 0.95, color="#1f77b4", label="accuracy")
    bottom = np.minimum(acc[used], conf[used])
    ax.bar(centres[used], np.abs(conf[used] - acc[used]), bottom=bottom, width=width * 0.95, color="#d62728",
           alpha=0.35, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {ece:.4f} ({bins} equal-width bins, top-1)", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    below = fig.add_subplot(grid[3, 0])
    total = max(count.sum(), 1.0)
    below.bar(centres, count / total, width=width * 0.95, color="#7f7f7f")
    below.set_xlim(0, 1)
    below.set_xlabel("confidence (max softmax probability)")
    below.set_ylabel("share")
    return png_bytes(fig)


def training_curves(*, metrics: list[dict]) -> bytes:
    """metrics.jsonl, by epoch (RunDir.read_metrics: 1-based, epochs done): loss, top-1, learning rate,
    validation groups."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in metrics]

    def column(key):
        return [(e, r[key]) for e, r in zip(epochs, metrics, strict=True)
                if r.get(key) is not None and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    has_val_groups = any(r.get(k) is not None for r in metrics for k in ("val_many", "val_medium", "val_few"))
    fig = new_figure(10.0, 6.0)
    axes = [fig.add_subplot(2, 2, k) for k in range(1, 5)]
    panels = [
        (axes[0], [("train_loss", "train loss")], "loss", False, "training loss"),
        (axes[1], [("train_top1", "train top-1"), ("val_top1", "validation top-1")], "accuracy (%)", False,
         "top-1: train vs validation"),
        (axes[2], [("lr", "learning rate")], "learning rate", True, "learning rate"),
    ]
    if has_val_groups:
        panels.append((axes[3], [("val_many", "val many"), ("val_medium", "val medium"), ("val_few", "val few")],
                       "validation accuracy (%)", False, "validation: many / medium / few"))
    else:
        panels.append((axes[3], [("images_per_s", "images / s")], "training images / s", False, "training speed"))
    for ax, keys, ylabel, log, title in panels:
        ax.set_title(title, fontsize=10)
        drawn = 0
        for k, (key, label) in enumerate(keys):
            pts = column(key)
            if not pts:
                continue
            colour = (GROUP_COLOURS.get(key.removeprefix("val_")) if key.startswith("val_") and key != "val_top1"
                      else RUN_COLOURS[k])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) <= 40 else None,
                    markersize=3, linewidth=1, color=colour, label=label)
            drawn += 1
        if log and drawn and all(p[1] > 0 for key, _ in keys for p in column(key)):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8, frameon=False)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    return png_bytes(fig)


def weight_norms(*, series: list[tuple[str, list]], train_counts, class_names, title: str = "") -> bytes:
    """Per-class L2 norm of the linear head's weight, classes head to tail (seed 000, Fig. 6).

    `series`: (label, C norms in class order) per run or per tau-normalisation; the
    training counts give the order, so every series must belong to runs with these counts.
    """
    counts = np.asarray(train_counts)
    order = head_to_tail(counts)
    C = len(order)
    fig = new_figure(min(14.0, max(6.5, 0.2 * C + 3.0)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    bins = binned(order) if many_classes(C) else None
    for k, (label, norms) in enumerate(series):
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        if bins is not None:  # mean and interquartile band of each bin of classes, head to tail
            keep, mean, low, high = _bin_summary(np.asarray(norms, dtype=float), bins)
            xs = np.array([b.mean() for b in np.array_split(np.arange(C), len(bins))])[keep]
            ax.plot(xs, mean, linewidth=1, color=colour, label=label)
            ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
            continue
        ax.plot(np.arange(C), np.asarray(norms, dtype=float)[order], marker="o" if C <= 100 else None,
                markersize=4, linewidth=1, color=colour, label=label)
    _class_ticks(ax, "x", order, class_names, rotate=_crowded(class_names, C))
    if bins is not None:
        ax.set_xlabel(f"class rank, head to tail ({len(bins)} bins of ~{C // len(bins)} classes: mean, 25-75 % band)")
    if C <= MAX_CLASS_LABELS:
        ax.set_xlabel("class, head to tail (training count descending)")
    ax.set_ylabel("||w_c||_2 of the classifier")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1 or (series and series[0][0]):
        ax.legend(fontsize=8, frameon=False, loc="best")
    return png_bytes(fig)


def training_curves_overlay(*, runs: list[tuple[str, list[dict]]]) -> bytes:
    """Every run's curves on shared axes (metrics.jsonl rows per run): training loss, and top-1 with
    validation solid and train dashed, one colour per run. A run without rows keeps its legend entry."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11.0, 4.2)
    loss_ax, top_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    handles = []
    for k, (label, metrics) in enumerate(runs):
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]

        def column(key):
            pts = [(int(r["epoch"]), r[key]) for r in metrics if isinstance(r.get(key), (int, float))
                   and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
            return [p[0] for p in pts], [p[1] for p in pts]

        marker = "o" if len(metrics) <= 40 else None
        loss_ax.plot(*column("train_loss"), color=colour, marker=marker, markersize=3, linewidth=1)
        top_ax.plot(*column("val_top1"), color=colour, marker=marker, markersize=3, linewidth=1)
        top_ax.plot(*column("train_top1"), color=colour, linestyle="--", linewidth=1, alpha=0.7)
        handles.append(Line2D([], [], color=colour, label=label if metrics else f"{label} (no epochs)"))
    for ax, ylabel, title in ((loss_ax, "loss", "training loss, every run"),
                              (top_ax, "top-1 (%)", "top-1: validation (solid) vs train (dashed)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    style = [Line2D([], [], color="grey", label="validation"), Line2D([], [], color="grey", linestyle="--",
                                                                        label="train")]
    top_ax.legend(handles=handles + style, fontsize=8, frameon=False, loc="best")
    loss_ax.legend(handles=handles, fontsize=8, frameon=False, loc="best")
    return png_bytes(fig)
