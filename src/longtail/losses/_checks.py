"""Validation of loss hyper-parameters: ValueError naming the allowed values."""

from __future__ import annotations

import math


def number(name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, checked to be a finite real number in the given interval.

    Booleans are rejected (YAML `yes` is not a number). The message names the interval,
    e.g. "gamma must be a number >= 0, got -1".
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        where = f" {' and '.join(parts)}" if parts else ""
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def integer(name: str, value, *, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value
