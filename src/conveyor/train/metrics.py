"""metrics.jsonl: one JSON object per line, appended as training goes.

Two kinds of rows share the file, told apart by their keys::

    {"step": 10, "loss": 5.91, "lr": 0.002, "grad_norm": 0.84, "tokens_per_s": 8100.0, "elapsed_s": 3.1}
    {"step": 10, "val_loss": 5.87, "val_ppl": 354.2}

A row is written as soon as it is known, with one ``write`` of the whole line (cut
back if the disk refuses part of it), so a crashed run keeps its curve and a reader
never sees half a row; ``read_metrics`` skips a torn last line all the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ..data.errors import DataError

__all__ = ["METRICS_FILE", "MetricsWriter", "eval_rows", "perplexity", "read_metrics", "train_rows"]

METRICS_FILE = "metrics.jsonl"
_NUMBERS = ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_loss", "val_ppl")


class MetricsWriter:
    """Appends rows to a metrics.jsonl, each line whole or not at all."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row; DataError (the file as it was) if the disk refuses it."""
        line = (json.dumps(row) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            done = os.write(self._fd, line)
            while done < len(line):  # a short write: the rest, or an error
                done += os.write(self._fd, line[done:])
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)  # no torn line left behind
            raise DataError(f"cannot write {self.path}: {err.strerror}; free disk space (the "
                            "checkpoints written so far are intact; resume from the last "
                            "one)") from None

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl; a line cut short by a crash (the last) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _well_formed(row):
            rows.append(row)
    return rows


def _well_formed(row: dict[str, Any]) -> bool:
    """An integer step and numbers where the reports expect them."""
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return False
    return all(isinstance(row[k], (int, float)) and not isinstance(row[k], bool)
               for k in _NUMBERS if k in row)


def train_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-step rows (those with a loss)."""
    return [r for r in rows if "loss" in r]


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation rows (those with a val_loss)."""
    return [r for r in rows if "val_loss" in r]


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
