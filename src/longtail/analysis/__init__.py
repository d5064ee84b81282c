"""Analyses of trained runs (seed 000, Sec. 5.2-5.3): classifier weight norms and their
spread, tau-normalisation, t-SNE of features (docs/analysis.md).

Modules: `norms` (statistics of a linear head; also read by the HTML report), `embedding`
(t-SNE, silhouettes), `plots` (the t-SNE figure), `analyze` (`analyze_runs`: run folders ->
OUT/analysis.json + PNGs), `command` (the `longtail analyze` parser). `analyze` is not
imported here, so that `longtail.report` can use `norms` without an import cycle.
"""

from .norms import norm_statistics, tau_normalise, weight_norm_report

__all__ = ["norm_statistics", "tau_normalise", "weight_norm_report"]
