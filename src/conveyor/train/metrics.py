"""metrics.jsonl: one JSON object per line, appended as training goes.

Two kinds of rows share the file, told apart by their keys::

    {"step": 10, "loss": 5.91, "lr": 0.002, "grad_norm": 0.84, "tokens_per_s": 8100.0, "elapsed_s": 3.1}
    {"step": 10, "val_loss": 5.87, "val_ppl": 354.2}

A row is written and flushed as soon as it is known, so a crashed run keeps its curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "MetricsWriter", "eval_rows", "perplexity", "read_metrics", "train_rows"]

METRICS_FILE = "metrics.jsonl"
_NUMBERS = ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_loss", "val_ppl")


class MetricsWriter:
    """Appends rows to a metrics.jsonl, one flushed line each."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

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
