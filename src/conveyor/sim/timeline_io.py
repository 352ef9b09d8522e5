"""Timelines on disk: measured (or simulated) per-rank actions as plain JSON.

``{"meta": {...}, "ranks": {"0": [["1F0", start_s, end_s], ...], ...}}`` -- small,
diffable, and enough to redraw a step next to its simulation later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..schedules.ir import Action
from ..schedules.validate import TimedAction
from .render import Timeline

__all__ = ["save_timeline", "load_timeline"]


def save_timeline(timeline: Timeline, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``rank -> [TimedAction]`` (times in seconds) as JSON."""
    ranks = {
        str(r): [[str(t.action), round(t.start, 7), round(t.end, 7)] for t in row]
        for r, row in sorted(timeline.items())
    }
    path = Path(path)
    path.write_text(json.dumps({"meta": meta or {}, "ranks": ranks}))
    return path


def load_timeline(path: str | Path) -> tuple[dict[int, list[TimedAction]], dict[str, Any]]:
    """Read a timeline written by :func:`save_timeline`; returns (timeline, meta)."""
    raw = json.loads(Path(path).read_text())
    timeline = {
        int(r): [TimedAction(int(r), Action.parse(a), float(s), float(e), float(s))
                 for a, s, e in row]
        for r, row in raw["ranks"].items()
    }
    return timeline, raw.get("meta", {})
