"""Optimizers: a registry of builders over parameter groups, and the per-epoch learning rate."""

from .groups import ParamGroup, no_decay_split, set_learning_rate
from .optimizers import OPTIMIZERS, build_optimizer
from .schedule import learning_rate

__all__ = ["OPTIMIZERS", "ParamGroup", "build_optimizer", "learning_rate", "no_decay_split", "set_learning_rate"]
