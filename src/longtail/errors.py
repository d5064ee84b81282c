"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib


class LongtailError(Exception):
    """Base class of every error caused by user input (config, data, paths, files)."""


class ConfigError(LongtailError, ValueError):
    """A config key, value or type is not accepted."""


class DataError(LongtailError):
    """A dataset path, file, image or label is not usable."""


class CheckpointError(LongtailError):
    """A checkpoint or run folder is missing, truncated, corrupt or unsafe."""


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
