"""Logging: one logger per module (`logging.getLogger(__name__)`), set up once by the command line.

Library code never prints and takes no `log=print` callables: it logs INFO lines (a run's
epochs, what a command wrote) and WARNING lines (a checkpoint fallback, a class without test
images) on the "longtail" logger hierarchy. `setup()` (called by `longtail.cli.main`) shows
INFO lines on stdout as plain text and WARNING and above on stderr as
"longtail: warning: ...". Lines go through `tqdm.write`, so an open progress bar stays intact.
From Python nothing is shown unless logging is configured: `longtail.log.setup()` gives the
command line's output, `logging.basicConfig(level=logging.INFO)` the standard one.
`warnings_only()` hides the INFO lines of a block (the runs a demo or a study trains).

Progress bars (tqdm, on stderr) are drawn only where they can be redrawn: `bar_enabled(wanted)`
is False when stderr is not a terminal (a file, a pipe, a CI log), so a redirected run writes
its one INFO line per epoch and no carriage-return updates (`train.progress: true` means "a
bar on a terminal").
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = "longtail"


class _Console(logging.Handler):
    """INFO to the current sys.stdout, WARNING and above to the current sys.stderr (looked up at
    each line, so redirections made after setup, e.g. by pytest's capsys, are followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            text = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"longtail: {record.levelname.lower()}: {text}", file=sys.stderr)
            else:
                tqdm.write(text, file=sys.stdout)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: '42.0 s', '7.5 min', '2.25 h'."""
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def bar_enabled(wanted: bool = True) -> bool:
    """Whether to draw a progress bar: `wanted` and sys.stderr (where tqdm writes) is a terminal."""
    if not wanted:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def setup(level: int = logging.INFO) -> logging.Logger:
    """Show the "longtail" loggers' lines on the console (idempotent)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


@contextmanager
def warnings_only(name: str = ROOT) -> Iterator[None]:
    """Within the block, the `name` logger and its children drop INFO lines; warnings still show."""
    logger = logging.getLogger(name)
    before = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)
