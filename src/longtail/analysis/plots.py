"""The t-SNE map figure (seed 000, Fig. 5); the weight-norm figure (Fig. 6) is
`longtail.report.figures.weight_norms`, shared with the HTML report."""

from __future__ import annotations

import numpy as np

from ..report.figures import new_figure, png_bytes, head_to_tail

TAB20_LIMIT = 20  # up to this many classes: one qualitative colour each and a legend


def tsne_map(*, coords: np.ndarray, labels: np.ndarray, class_names, train_counts, title: str = "") -> bytes:
    """Scatter of a 2-D t-SNE map (n, 2), one colour per class, legend head to tail with the
    training counts; above 20 classes, colour by frequency rank (head dark, tail light)."""
    import matplotlib

    coords = np.asarray(coords)
    labels = np.asarray(labels)
    order = head_to_tail(train_counts)
    C = len(order)
    fig = new_figure(8.0 if C <= TAB20_LIMIT else 7.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    if C <= TAB20_LIMIT:
        cmap = matplotlib.colormaps["tab10" if C <= 10 else "tab20"]
        for rank, c in enumerate(order):
            mask = labels == c
            ax.scatter(coords[mask, 0], coords[mask, 1], s=4, alpha=0.7, color=cmap(rank), linewidths=0,
                       label=f"{class_names[c]} ({int(train_counts[c])})")
        ax.legend(fontsize=7, frameon=False, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  title="class (train images)", title_fontsize=7)
    else:
        rank_of = np.empty(C, dtype=np.int64)
        rank_of[order] = np.arange(C)
        points = ax.scatter(coords[:, 0], coords[:, 1], s=3, alpha=0.7, c=rank_of[labels], cmap="viridis",
                            linewidths=0, vmin=0, vmax=C - 1)
        fig.colorbar(points, ax=ax, fraction=0.046, pad=0.04, label="class rank by training count (0 = head)")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return png_bytes(fig)
