"""Methods: recipes that build model, loss, sampler and parameter groups once per run, and the
hooks the loop calls (base.py). Every module of this package is imported here, so a method
registers itself by being in the package."""

import importlib
import pkgutil

from .base import Method, Recipe, Services, StepResult, build_method, build_recipe, class_weight_for, rebuild_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Recipe", "Services", "StepResult", "build_method", "build_recipe", "class_weight_for",
           "rebuild_model"]
