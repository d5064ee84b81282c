"""Losses: one module per family, each an nn.Module(logits, target) built from class_counts."""

from ..registry import LOSSES
from . import (  # noqa: F401  (registration)
    balanced_softmax,
    ce,
    class_balanced,
    eql,
    focal,
    ghm,
    ghm_cwap,
    label_smoothing,
    ldam,
    logit_adjustment,
    seesaw,
    swrm,
)
from .base import Loss, effective_number_weights, inverse_frequency_weights


def build_loss(name: str, params: dict | None = None, *, class_counts) -> Loss:
    return LOSSES.build(name, class_counts=class_counts, **(params or {}))


__all__ = ["Loss", "build_loss", "effective_number_weights", "inverse_frequency_weights"]
