"""Losses: one module per family, each an nn.Module(logits, target) built from class_counts.

Every module of this package is imported here, so a loss registers itself by being in the
package (tests/test_registries.py fails on a Loss class that is not registered)."""

import importlib
import pkgutil

from ..registry import LOSSES
from .base import Loss, effective_number_weights, inverse_frequency_weights

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_loss(name: str, params: dict | None = None, *, class_counts) -> Loss:
    return LOSSES.build(name, class_counts=class_counts, **(params or {}))


__all__ = ["Loss", "build_loss", "effective_number_weights", "inverse_frequency_weights"]
