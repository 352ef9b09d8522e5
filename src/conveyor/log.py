"""One logger for the whole library; every line carries the rank that wrote it."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["get_logger", "setup_logging"]

_ROOT = "conveyor"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (test captures and redirections swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "-")
        return True


def get_logger(name: str) -> logging.Logger:
    """The library logger for ``name`` (a module's ``__name__``)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def setup_logging(level: int | str = logging.INFO) -> None:
    """Send conveyor's log lines to stderr as ``[rank N] LEVEL message`` (idempotent)."""
    root = logging.getLogger(_ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_conveyor", False) for h in root.handlers):
        handler = _StderrHandler()
        handler._conveyor = True  # type: ignore[attr-defined]
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.propagate = False
