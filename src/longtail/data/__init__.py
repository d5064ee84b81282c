"""Data: sources, long-tail profiles, the prepared store, augmentation and samplers."""

from .build import DataInfo, LTData, Split, build_data
from .profiles import class_counts

__all__ = ["DataInfo", "LTData", "Split", "build_data", "class_counts"]
