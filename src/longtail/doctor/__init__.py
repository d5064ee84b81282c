"""`longtail doctor`: a dataset's classes, counts, imbalance, duplicates and unreadable files,
and (with a trained run) its confusable head-tail class pairs, before any training."""

from .report import format_report, run_doctor

__all__ = ["format_report", "run_doctor"]
