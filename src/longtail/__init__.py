"""longtail: a PyTorch toolkit for long-tailed image recognition."""

from . import losses, methods, models  # noqa: F401  (fill the registries)
from . import log  # noqa: F401  (longtail.log.setup(): the command line's progress lines)
from .config import RunConfig, load_config
from .data import build_data, class_counts
from .data import samplers  # noqa: F401
from .inference import load
from .runs import evaluate_run, train_run

__version__ = "0.1.0"
__all__ = ["RunConfig", "build_data", "class_counts", "evaluate_run", "load", "load_config", "train_run"]
