"""The count histogram: training images per class, sorted head to tail, coloured by shot group.

Drawn with matplotlib's Agg canvas on a `Figure` of its own (no pyplot state, no display
needed); dashed lines at the many / few thresholds; a log count axis when the imbalance
ratio exceeds 20. Class names label the bars up to 40 classes, ranks beyond that.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}


def plot_class_counts(stats: dict, class_names: list[str], path: str | Path, *, title: str = "") -> None:
    """Write the PNG of `class_statistics` output `stats` to `path` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    counts = np.asarray(stats["counts"])
    order = np.argsort(-counts, kind="stable")
    group = {name: g for g, names in stats["groups"].items() for name in names}
    C = len(counts)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.22 * C + 2.0)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [GROUP_COLOURS[group[class_names[i]]] for i in order]
    ax.bar(np.arange(C), counts[order], width=0.9 if C <= 200 else 1.0, color=colours, linewidth=0)
    t = stats["thresholds"]
    ax.axhline(t["many"], color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(t["few"], color="grey", linestyle=":", linewidth=0.8)
    if stats["imbalance_ratio"] > 20 and counts.min() > 0:
        ax.set_yscale("log")
    if C <= 40:
        ax.set_xticks(np.arange(C))
        tilt = C > 10
        ax.set_xticklabels([class_names[i] for i in order], rotation=60 if tilt else 0,
                           ha="right" if tilt else "center", fontsize=8)
        ax.set_xlabel("class (sorted by count)")
    else:
        ax.set_xlabel("class rank (sorted by count)")
    ax.set_ylabel("training images")
    sizes = stats["group_sizes"]
    ax.legend(handles=[Patch(color=GROUP_COLOURS[g], label=f"{g} ({sizes[g]})") for g in ("many", "medium", "few")],
              loc="upper right", fontsize=8, frameon=False)
    ax.set_title(title or f"{stats['num_images']} images, {C} classes, imbalance ratio {stats['imbalance_ratio']:.1f}",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
