"""Methods: recipes that configure model, loss, sampler and per-epoch hooks of the loop."""

from ..registry import METHODS
from . import decoupled, isda, lcreg, mislas, ssp, standard, swrm  # noqa: F401  (registration)
from .base import Method, class_weight_for


def build_method(cfg, data) -> Method:
    return METHODS.build(cfg.method.name, cfg=cfg, data=data, **cfg.method.params)


__all__ = ["Method", "build_method", "class_weight_for"]
