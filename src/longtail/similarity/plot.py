"""Per-class SWR weights against class-balanced weights (seed 001, Fig. 2).

Classes on the x axis head to tail (training count descending, ties in class-index order);
both weight vectors are rescaled to sum C (the class-balanced weights already are), so the
curves compare shapes: CB weights depend on the count only, SWR weights (Eq. 2) also on the
class's similarity window, so classes of similar counts can get different SWR weights. The
training count is drawn on a second (log) axis. Drawn on a matplotlib `Figure` with the Agg
canvas (no pyplot state), written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes

MAX_CLASS_LABELS = 40


def normalise_to_sum_c(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum() * len(w)


def plot_weights(swr_weights, cb_weights, class_counts, class_names: list[str], path: str | Path, *,
                 title: str = "") -> None:
    """Write the PNG of SWR vs class-balanced weights per class to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(class_counts)
    order = np.argsort(-counts, kind="stable")
    C = len(counts)
    x = np.arange(C)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.18 * C + 3.0)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    marker = "o" if C <= 40 else None
    ax.plot(x, normalise_to_sum_c(swr_weights)[order], marker=marker, markersize=4, color="#d62728",
            label="SWR (Eq. 2), scaled to sum C")
    ax.plot(x, normalise_to_sum_c(cb_weights)[order], marker=marker, markersize=4, color="#1f77b4",
            label="class-balanced (effective number)")
    ax.set_ylabel("class weight (sum = C)")
    twin = ax.twinx()
    twin.bar(x, counts[order], width=0.8, color="grey", alpha=0.18, linewidth=0)
    if counts.min() > 0 and counts.max() / counts.min() > 20:
        twin.set_yscale("log")
    twin.set_ylabel("training images", color="grey")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    if C <= MAX_CLASS_LABELS:
        ax.set_xticks(x)
        ax.set_xticklabels([class_names[i] for i in order], rotation=45 if C > 6 else 0,
                           ha="right" if C > 6 else "center", fontsize=8)
        ax.set_xlabel("class (head to tail)")
    else:
        ax.set_xlabel("class rank (head to tail)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(title or "per-class weights: SWR vs class-balanced", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
