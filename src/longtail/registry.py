"""One registry per kind of component: losses, samplers, models, heads, methods, data sources.

Each component registers itself with a decorator in the module that defines it; the packages
import all their modules, and tests/test_registries.py fails on a component that is not registered.

Example:
    >>> from longtail.registry import Registry
    >>> THINGS = Registry("thing")
    >>> @THINGS.register("double")
    ... def double(*, factor=2):
    ...     return factor * 2
    >>> THINGS.build("double", factor=3)
    6
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .errors import ConfigError, did_you_mean


class Registry:
    """Maps snake_case names to builders (classes or functions with keyword arguments)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def summary(self, name: str) -> str:
        """First line of the builder's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def build(self, name: str, **kwargs: Any) -> Any:
        """Build `name` with keyword arguments; unknown arguments raise ConfigError."""
        builder = self.get(name)
        target = builder.__init__ if inspect.isclass(builder) else builder
        params = inspect.signature(target).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not accepts_any:
            allowed = [p for p in params if p not in ("self",)]
            for key in kwargs:
                if key not in allowed:
                    raise ConfigError(
                        f"{self.kind} '{name}' has no parameter '{key}'"
                        f"{did_you_mean(key, allowed)}; allowed: {', '.join(allowed) or 'none'}"
                    )
        try:
            return builder(**kwargs)
        except TypeError as err:  # wrong types reaching a builder
            raise ConfigError(f"{self.kind} '{name}': {err}") from err


LOSSES = Registry("loss")
SAMPLERS = Registry("sampler")
MODELS = Registry("model")
HEADS = Registry("head")
METHODS = Registry("method")
SOURCES = Registry("source")  # data/sources.py: loader(cfg: DataConfig, progress) -> RawData
