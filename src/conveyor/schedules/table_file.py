"""Hand-written schedules as a CSV table, one row per rank.

The first cell of a row is the rank, then one cell per action in the order the
rank runs them: ``F3``, ``B3``, ``W3`` when the rank holds one stage, or with the
stage in front, ``2F3``, when it holds several (interleaved or V placement).
Trailing empty cells are ignored. Lines starting with ``#`` are comments; in them
``key=value`` words set the layout (any of them may be left out)::

    # placement=looped chunks=1 microbatches=4 name=my-1f1b
    0,F0,F1,F2,B0,F3,B1,B2,B3
    1,F0,F1,B0,F2,B1,F3,B2,B3
    2,F0,B0,F1,B1,F2,B2,F3,B3

``placement`` is ``looped`` (default; stage s on rank s % ranks) or ``vshape``
(two chunks per rank, rank r holding stages r and 2 * ranks - 1 - r). ``chunks``
defaults to 2 for vshape and, for looped, to what the largest explicit stage
needs. ``microbatches`` defaults to the largest microbatch + 1. The number of ranks
is the number of rows.

Every problem raises ScheduleError naming the rank (row), the column (1-based
cell index; the rank is column 1) and the reason; the reader finishes with
:func:`~conveyor.schedules.validate`, so what it returns can run.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from .ir import Action, Kind, Placement, Schedule, ScheduleError
from .validate import DeadlockError, validate

__all__ = ["read_schedule_csv", "format_schedule_csv", "write_schedule_csv"]

_CELL = re.compile(r"^(\d+)?([FBW])(\d+)$")
_NAME = re.compile(r"^[\w.+-]+$")
_KEYS = ("placement", "chunks", "microbatches", "name")

Cell = tuple[int, int, int | None, Kind, int]  # rank, column, stage or None, kind, microbatch


def read_schedule_csv(source: str | os.PathLike[str]) -> Schedule:
    """Read a schedule table from a file path, or from CSV text (a str holding ',' or a newline)."""
    if isinstance(source, str) and ("\n" in source or "," in source):
        text, name, where = source, "table", "schedule table"
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as err:
            raise ScheduleError(f"cannot read schedule table {str(path)!r}: {err.strerror}") from None
        name, where = path.stem, f"schedule table {str(path)!r}"
    try:
        return _parse(text, name)
    except ScheduleError as err:
        raise ScheduleError(f"{where}: {err}") from None


def format_schedule_csv(schedule: Schedule) -> str:
    """The table text of ``schedule``; :func:`read_schedule_csv` reads it back equal."""
    if schedule.lowered:
        raise ScheduleError(
            f"schedule {schedule.name!r} is lowered; write the table before lower(), "
            "it holds only F, B and W"
        )
    place = schedule.placement
    if place.shape == "custom":
        raise ScheduleError(
            f"schedule {schedule.name!r} has placement {place.stage_to_rank}, which a table "
            "cannot state; only looped and vshape placements can be written"
        )
    chunks = place.num_stages // place.num_ranks
    header = f"# placement={place.shape} chunks={chunks} microbatches={schedule.num_microbatches}"
    if _NAME.match(schedule.name):
        header += f" name={schedule.name}"
    lines = [header]
    for rank in range(schedule.num_ranks):
        cells = [str(rank)]
        for a in schedule.actions[rank]:
            cells.append(str(a) if chunks > 1 else f"{a.kind.value}{a.microbatch}")
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_schedule_csv(schedule: Schedule, path: str | os.PathLike[str]) -> None:
    """Write ``schedule`` as a table to ``path`` (see :func:`format_schedule_csv`)."""
    Path(path).write_text(format_schedule_csv(schedule))


def _parse(text: str, default_name: str) -> Schedule:
    settings: dict[str, str] = {}
    rows: dict[int, list[Cell]] = {}
    row_line: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            _read_settings(stripped[1:], lineno, settings)
            continue
        cells = next(csv.reader([line]))
        rank = _read_rank(cells[0], lineno)
        if rank in rows:
            raise ScheduleError(
                f"rank {rank}, column 1: rank {rank} has two rows (lines {row_line[rank]} "
                f"and {lineno}); give each rank one row"
            )
        rows[rank] = _read_cells(rank, cells[1:])
        row_line[rank] = lineno
    if not rows:
        raise ScheduleError("no rows; write one row per rank, e.g. '0,F0,B0'")
    missing = [r for r in range(len(rows)) if r not in rows]
    if missing:
        raise ScheduleError(
            f"rank {missing[0]} has no row; the rows are for ranks "
            f"{', '.join(map(str, sorted(rows)))} and must be 0..{len(rows) - 1}, one each"
        )
    placement = _placement(settings, len(rows), [c for row in rows.values() for c in row])
    actions = {r: _resolve(placement, row) for r, row in sorted(rows.items())}
    largest = max((a.microbatch for acts in actions.values() for a in acts), default=-1)
    m = _int_setting(settings, "microbatches") if "microbatches" in settings else largest + 1
    _check_actions(rows, actions, placement, m)
    name = settings.get("name", default_name)
    schedule = Schedule.build(name, m, placement, actions)
    try:
        validate(schedule)
    except DeadlockError as err:
        stuck = "; ".join(
            f"rank {r}, column {step + 2}: {schedule.actions[r][step]} waits for "
            + ", ".join(f"{x} (rank {placement.rank_of(x.stage)})" for x in waiting)
            for (r, step), waiting in err.waits.items()
        )
        raise ScheduleError(f"the table deadlocks, no rank can go on: {stuck}") from None
    return schedule


def _read_settings(comment: str, lineno: int, settings: dict[str, str]) -> None:
    for word in comment.split():
        if "=" not in word:
            continue  # free comment text
        key, value = word.split("=", 1)
        if key not in _KEYS:
            raise ScheduleError(
                f"line {lineno}: unknown setting {key!r}; use "
                + ", ".join(f"{k}=" for k in _KEYS)
            )
        if key in settings and settings[key] != value:
            raise ScheduleError(
                f"line {lineno}: {key} is set twice ({settings[key]!r} and {value!r}); keep one"
            )
        settings[key] = value


def _int_setting(settings: dict[str, str], key: str) -> int:
    value = settings[key]
    if not value.isdigit() or int(value) < 1:
        raise ScheduleError(f"header: {key}={value!r} must be a positive integer")
    return int(value)


def _read_rank(cell: str, lineno: int) -> int:
    text = cell.strip()
    if not text.isdigit():
        raise ScheduleError(
            f"line {lineno}, column 1: {text!r} is not a rank; start each row with its "
            "rank number (0, 1, ...)"
        )
    return int(text)


def _read_cells(rank: int, cells: list[str]) -> list[Cell]:
    texts = [c.strip() for c in cells]
    while texts and not texts[-1]:
        texts.pop()  # trailing empty cells
    out: list[Cell] = []
    for i, text in enumerate(texts):
        column = i + 2
        if not text:
            raise ScheduleError(
                f"rank {rank}, column {column}: empty cell between actions; remove it"
            )
        match = _CELL.match(text)
        if match is None:
            raise ScheduleError(
                f"rank {rank}, column {column}: {text!r} is not an action; "
                "write F3, B3, W3 or 2F3"
            )
        stage = int(match.group(1)) if match.group(1) is not None else None
        out.append((rank, column, stage, Kind(match.group(2)), int(match.group(3))))
    return out


def _placement(settings: dict[str, str], num_ranks: int, cells: list[Cell]) -> Placement:
    shape = settings.get("placement", "looped")
    chunks = _int_setting(settings, "chunks") if "chunks" in settings else None
    if shape == "vshape":
        if chunks not in (None, 2):
            raise ScheduleError(
                f"header: placement=vshape holds 2 chunks per rank, not chunks={chunks}; "
                "write chunks=2 or leave it out"
            )
        return Placement.vshape(num_ranks)
    if shape != "looped":
        raise ScheduleError(f"header: placement={shape!r} is unknown; use looped or vshape")
    if chunks is None:
        largest = max((c[2] for c in cells if c[2] is not None), default=0)
        chunks = largest // num_ranks + 1
    return Placement.looped(num_ranks, chunks)


def _resolve(placement: Placement, row: list[Cell]) -> list[Action]:
    out = []
    for rank, column, stage, kind, mb in row:
        here = placement.stages_of(rank)
        if stage is None:
            if len(here) != 1:
                text = f"{kind.value}{mb}"
                raise ScheduleError(
                    f"rank {rank}, column {column}: {text!r} needs its stage, as rank {rank} "
                    f"holds stages {', '.join(map(str, here))}; write e.g. {here[0]}{text}"
                )
            stage = here[0]
        elif stage >= placement.num_stages:
            raise ScheduleError(
                f"rank {rank}, column {column}: stage {stage} does not exist; the placement "
                f"has stages 0..{placement.num_stages - 1}"
            )
        elif placement.rank_of(stage) != rank:
            raise ScheduleError(
                f"rank {rank}, column {column}: stage {stage} is on rank "
                f"{placement.rank_of(stage)}, not rank {rank}; rank {rank} holds stages "
                f"{', '.join(map(str, here))}"
            )
        out.append(Action(stage, kind, mb))
    return out


def _check_actions(
    rows: dict[int, list[Cell]], actions: dict[int, list[Action]], placement: Placement, m: int
) -> None:
    """Per-cell range and duplicate checks, then that every needed action appears."""
    seen: dict[Action, int] = {}
    for rank, acts in actions.items():
        for cell, action in zip(rows[rank], acts, strict=True):
            column = cell[1]
            for a in action.parts:
                if a.microbatch >= m:
                    raise ScheduleError(
                        f"rank {rank}, column {column}: microbatch {a.microbatch} is out of range "
                        f"0..{m - 1} (microbatches={m})"
                    )
                if a in seen:
                    raise ScheduleError(
                        f"rank {rank}, column {column}: {a} appears twice (also column {seen[a]})"
                    )
                seen[a] = column
    # the same rule as validate.check_coverage: F always; unless forward-only, B or I and W
    backward = any(a.kind is not Kind.F for a in seen)
    for stage in range(placement.num_stages):
        rank = placement.rank_of(stage)
        for mb in range(m):
            needed = [Action(stage, Kind.F, mb)]
            if Action(stage, Kind.I, mb) in seen or Action(stage, Kind.W, mb) in seen:
                needed += [Action(stage, Kind.I, mb), Action(stage, Kind.W, mb)]
            elif backward:
                needed.append(Action(stage, Kind.B, mb))
            for a in needed:
                if a not in seen:
                    raise ScheduleError(
                        f"rank {rank}: the table never runs {a}; add it to rank {rank}'s row"
                    )
