"""lorakit's console lines, through the standard `logging` module.

Every module logs to a child of the "lorakit" logger. That logger has one handler, which writes
`lorakit: <message>` to the current sys.stdout (`lorakit demo: ...` for lorakit.demo), so a
script sees the lines a `lorakit` command prints. A library user silences them with
`logging.getLogger("lorakit").setLevel(logging.WARNING)`, or sends them elsewhere by replacing
the handler (`configure(handler=...)`) or with `propagate`. Processes other than rank 0 stay
quiet because their callers do not log, not because of a filter here.
"""

from __future__ import annotations

import logging
import sys

ROOT = "lorakit"
# packages whose loggers' lines carry their own prefix instead of "lorakit:"
_PREFIXES = {"lorakit.demo": "lorakit demo"}


class _Prefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = next(
            (shown for name, shown in _PREFIXES.items() if _within(record.name, name)), ROOT
        )
        return f"{prefix}: {record.getMessage()}"


def _within(logger: str, package: str) -> bool:
    return logger == package or logger.startswith(package + ".")


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler that writes to sys.stdout as it is at each line (pytest, a notebook or
    the user may replace it after lorakit is imported)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure(level: int | None = logging.INFO, handler: logging.Handler | None = None) -> None:
    """The "lorakit" logger's one handler (the default writes to stdout) and its level (None:
    INFO unless a level was set already)."""
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = handler or _CurrentStdout()
    if handler.formatter is None:
        handler.setFormatter(_Prefix())
    logger.addHandler(handler)
    if level is not None or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if level is None else level)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger for a lorakit module (`get_logger(__name__)`); the first call installs the
    default handler unless one is configured already."""
    if not logging.getLogger(ROOT).handlers:
        configure(level=None)
    return logging.getLogger(name)
