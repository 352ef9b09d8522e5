"""Hand-written schedules as a CSV table, one row per rank, in Conveyor's or torch's form.

Conveyor's form. The first cell of a row is the rank, then one cell per action in
the order the rank runs them: ``F3``, ``B3`` (full backward), ``I3`` (input-grad)
and ``W3`` (its weight-grad) when the rank holds one stage, or with the stage in
front, ``2F3``, when it holds several (interleaved or V placement). An overlapped
forward/backward pair is one cell, ``(2F5;1B3)OVERLAP_F_B`` (``(F5;B3)OVERLAP_F_B``
on a one-stage rank). Trailing empty cells are ignored. Lines starting with ``#``
are comments; in them ``key=value`` words set the layout (any may be left out)::

    # placement=looped chunks=1 microbatches=4 name=my-1f1b
    0,F0,F1,F2,B0,F3,B1,B2,B3
    1,F0,F1,B0,F2,B1,F3,B2,B3
    2,F0,B0,F1,B1,F2,B2,F3,B3

``placement`` is ``looped`` (default; stage s on rank s % ranks) or ``vshape``
(two chunks per rank, rank r holding stages r and 2 * ranks - 1 - r). ``chunks``
defaults to 2 for vshape and, for looped, to what the largest explicit stage
needs. ``microbatches`` defaults to the largest microbatch + 1. The number of ranks
is the number of rows.

Torch's form, what ``torch.distributed.pipelining``'s ``_dump_csv`` writes and its
``_load_csv(..., format="compute_only")`` reads: row r is rank r's actions, with no
rank column, each cell a full action string (``0F0``, ``1I2``, ``2W1``, ``0B2``,
``(0F3;1B1)OVERLAP_F_B``); empty cells are idle steps and are skipped. The reader
takes a file for torch's when the first cell of its first row is not a rank
number. The placement is read from which rank runs which stage (looped, vshape or
any other), ``microbatches`` from the largest microbatch. ``#`` lines may still
name the schedule or set ``microbatches``; ``placement``/``chunks``, if set, must
agree with the rows. ``format_schedule_csv(..., style="torch")`` writes this form.

Every problem raises ScheduleError naming the rank (row), the column (1-based cell
index; in Conveyor's form the rank is column 1) and the reason; the reader
finishes with :func:`~conveyor.schedules.validate`, so what it returns can run.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .ir import Action, Kind, Placement, Schedule, ScheduleError, overlap
from .validate import DeadlockError, validate

__all__ = ["read_schedule_csv", "format_schedule_csv", "write_schedule_csv"]

Style = Literal["conveyor", "torch"]

_SINGLE = re.compile(r"^(\d+)?([FBIW])(\d+)$")
_PAIR = re.compile(r"^\((.*)\)OVERLAP_F_B$")
_COMM = re.compile(r"^\d*(SEND_F|RECV_F|SEND_B|RECV_B)\d*$")
_NAME = re.compile(r"^[\w.+-]+$")
_KEYS = ("placement", "chunks", "microbatches", "name")
_HINT = "write F3, B3, I3, W3 or 2F3, or an overlapped pair such as (2F5;1B3)OVERLAP_F_B"
_TORCH_HINT = "write torch's action strings such as 0F3, 1I2, 2W1, 0B2 or (0F3;1B1)OVERLAP_F_B"

Part = tuple[int | None, Kind, int]  # stage (None: the rank's only one), kind, microbatch


@dataclass(frozen=True)
class _Cell:
    """One action cell: where it is, and its single action or its overlapped pair."""

    rank: int
    column: int
    parts: tuple[Part, ...]


def read_schedule_csv(source: str | os.PathLike[str]) -> Schedule:
    """Read a schedule table from a file path, or from CSV text (a str holding ',' or a newline)."""
    if isinstance(source, str) and ("\n" in source or "," in source):
        text, name, where = source, "table", "schedule table"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ScheduleError(f"cannot read schedule table {str(path)!r}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ScheduleError(f"schedule table {str(path)!r} is not UTF-8 text; pass a CSV "
                                "written by `conveyor schedule show --csv`") from None
        name, where = path.stem, f"schedule table {str(path)!r}"
    try:
        return _parse(text, name)
    except ScheduleError as err:
        raise ScheduleError(f"{where}: {err}") from None


def format_schedule_csv(schedule: Schedule, style: Style = "conveyor") -> str:
    """The table text of ``schedule``; :func:`read_schedule_csv` reads it back equal.

    ``style="torch"`` writes torch's compute-only form (no header, no rank column,
    full action strings), which torch's ``_load_csv`` reads; it holds no name, so
    the reader names the schedule after the file.
    """
    if style not in ("conveyor", "torch"):
        raise ScheduleError(f"style={style!r} is unknown; use 'conveyor' or 'torch'")
    if schedule.lowered:
        raise ScheduleError(
            f"schedule {schedule.name!r} is lowered; write the table before lower(), "
            "it holds only compute actions (F, B, I, W and overlapped pairs)"
        )
    if style == "torch":
        rows = [",".join(str(a) for a in schedule.actions[r]) for r in range(schedule.num_ranks)]
        return "\n".join(rows) + "\n"
    place = schedule.placement
    if place.shape == "custom":
        raise ScheduleError(
            f"schedule {schedule.name!r} has placement {place.stage_to_rank}, which a table "
            "cannot state; only looped and vshape placements can be written, or write "
            "style='torch', which reads the placement from the stages"
        )
    chunks = place.num_stages // place.num_ranks
    header = f"# placement={place.shape} chunks={chunks} microbatches={schedule.num_microbatches}"
    if _NAME.match(schedule.name):
        header += f" name={schedule.name}"
    lines = [header]
    for rank in range(schedule.num_ranks):
        cells = [str(rank)] + [_cell_text(a, stage=chunks > 1) for a in schedule.actions[rank]]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_schedule_csv(
    schedule: Schedule, path: str | os.PathLike[str], style: Style = "conveyor"
) -> None:
    """Write ``schedule`` as a table to ``path`` (see :func:`format_schedule_csv`)."""
    Path(path).write_text(format_schedule_csv(schedule, style))


def _cell_text(a: Action, *, stage: bool) -> str:
    """One cell of Conveyor's form: the action, its stage left out on one-stage ranks."""
    if stage:
        return str(a)
    text = ";".join(f"{p.kind.value}{p.microbatch}" for p in a.parts)
    return f"({text})OVERLAP_F_B" if a.kind is Kind.OVERLAP_F_B else text


def _parse(text: str, default_name: str) -> Schedule:
    settings: dict[str, str] = {}
    rows: dict[int, list[_Cell]] = {}
    row_line: dict[int, int] = {}
    torch_form: bool | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            _read_settings(stripped[1:], lineno, settings)
            continue
        cells = next(csv.reader([line]))
        if torch_form is None:
            torch_form = _is_torch_row(cells[0], lineno)
        if torch_form:
            rank = len(rows)
            rows[rank] = _read_cells(rank, cells, first_column=1, torch_form=True)
            continue
        rank = _read_rank(cells[0], lineno)
        if rank in rows:
            raise ScheduleError(
                f"rank {rank}, column 1: rank {rank} has two rows (lines {row_line[rank]} "
                f"and {lineno}); give each rank one row"
            )
        rows[rank] = _read_cells(rank, cells[1:], first_column=2, torch_form=False)
        row_line[rank] = lineno
    if not rows:
        raise ScheduleError("no rows; write one row per rank, e.g. '0,F0,B0'")
    missing = [r for r in range(len(rows)) if r not in rows]
    if missing:
        raise ScheduleError(
            f"rank {missing[0]} has no row; the rows are for ranks "
            f"{', '.join(map(str, sorted(rows)))} and must be 0..{len(rows) - 1}, one each"
        )
    cells = [c for row in rows.values() for c in row]
    if torch_form:
        placement = _placement_of_rows(settings, len(rows), cells)
    else:
        placement = _placement(settings, len(rows), cells)
    actions = {r: _resolve(placement, row) for r, row in sorted(rows.items())}
    largest = max((p.microbatch for acts in actions.values() for a in acts for p in a.parts),
                  default=-1)
    m = _int_setting(settings, "microbatches") if "microbatches" in settings else largest + 1
    _check_actions(rows, actions, placement, m)
    name = settings.get("name", default_name)
    schedule = Schedule.build(name, m, placement, actions)
    try:
        validate(schedule)
    except DeadlockError as err:
        stuck = "; ".join(
            f"rank {r}, column {rows[r][step].column}: {schedule.actions[r][step]} waits for "
            + ", ".join(f"{x} (rank {placement.rank_of(x.stage)})" for x in waiting)
            for (r, step), waiting in err.waits.items()
        )
        raise ScheduleError(f"the table deadlocks, no rank can go on: {stuck}") from None
    return schedule


def _is_torch_row(first: str, lineno: int) -> bool:
    """Which form the table is in, from its first row's first cell: a rank, or torch's action."""
    text = first.strip()
    if text.isdigit():
        return False
    if not text or _SINGLE.match(text) or _PAIR.match(text) or _COMM.match(text):
        return True
    raise ScheduleError(
        f"line {lineno}, column 1: {text!r} is neither a rank nor an action; start each row "
        "with its rank number (0, 1, ...), or write torch's rows of actions such as 0F0,0B0"
    )


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


def _read_cells(rank: int, cells: list[str], *, first_column: int, torch_form: bool) -> list[_Cell]:
    """The action cells of one row; torch's form skips empty (idle) cells, Conveyor's refuses them."""
    texts = [c.strip() for c in cells]
    while texts and not texts[-1]:
        texts.pop()  # trailing empty cells
    out: list[_Cell] = []
    for i, text in enumerate(texts):
        column = i + first_column
        if not text:
            if torch_form:
                continue  # an idle step in torch's table
            raise ScheduleError(
                f"rank {rank}, column {column}: empty cell between actions; remove it"
            )
        out.append(_Cell(rank, column, _read_parts(rank, column, text, torch_form)))
    return out


def _read_parts(rank: int, column: int, text: str, torch_form: bool) -> tuple[Part, ...]:
    """A cell's single action, or the forward and backward of its overlapped pair."""
    where = f"rank {rank}, column {column}"
    if _COMM.match(text):
        raise ScheduleError(
            f"{where}: {text!r} is communication; a table holds compute actions only "
            "(lower() adds SEND/RECV; torch's compute_only format)"
        )
    pair = _PAIR.match(text)
    texts = pair.group(1).split(";") if pair else [text]
    matches = [_SINGLE.match(t.strip()) for t in texts]
    if any(m is None for m in matches):
        raise ScheduleError(f"{where}: {text!r} is not an action; {_TORCH_HINT if torch_form else _HINT}")
    parts = tuple(
        (int(m.group(1)) if m.group(1) is not None else None, Kind(m.group(2)), int(m.group(3)))
        for m in matches
        if m is not None
    )
    if pair and (len(parts) != 2 or parts[0][1] is not Kind.F or not parts[1][1].is_backward):
        raise ScheduleError(
            f"{where}: {text!r} is not an overlapped pair; write a forward then a backward "
            "(B or I), e.g. (2F5;1B3)OVERLAP_F_B"
        )
    if torch_form and any(stage is None for stage, _, _ in parts):
        raise ScheduleError(
            f"{where}: {text!r} needs its stages in torch's form (e.g. 2F3 for stage 2); "
            "the placement is read from them"
        )
    return parts


def _placement(settings: dict[str, str], num_ranks: int, cells: list[_Cell]) -> Placement:
    """Conveyor's form: the placement the header names (looped by default)."""
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
        stages = [s for c in cells for s, _, _ in c.parts if s is not None]
        chunks = max(stages, default=0) // num_ranks + 1
    return Placement.looped(num_ranks, chunks)


def _placement_of_rows(settings: dict[str, str], num_ranks: int, cells: list[_Cell]) -> Placement:
    """Torch's form: each stage lives on the rank whose row runs it."""
    found: dict[int, _Cell] = {}
    for cell in cells:
        for stage, _, _ in cell.parts:
            assert stage is not None  # _read_parts requires it in torch's form
            other = found.setdefault(stage, cell)
            if other.rank != cell.rank:
                raise ScheduleError(
                    f"rank {cell.rank}, column {cell.column}: stage {stage} is also run by rank "
                    f"{other.rank} (column {other.column}); a stage lives on one rank"
                )
    n = max(found, default=-1) + 1
    absent = [s for s in range(n) if s not in found]
    if absent:
        raise ScheduleError(
            f"stage {absent[0]} appears on no row; the rows run stages up to {n - 1}, and each "
            "needs its actions"
        )
    placement = Placement(tuple(found[s].rank for s in range(n)))
    idle = [r for r in range(num_ranks) if not placement.stages_of(r)]
    if idle:
        raise ScheduleError(
            f"rank {idle[0]} runs no stage; every row needs the actions of at least one stage"
        )
    shape = settings.get("placement")
    chunks = _int_setting(settings, "chunks") if "chunks" in settings else None
    if (shape is not None and shape != placement.shape) or (
        chunks is not None and chunks * num_ranks != placement.num_stages
    ):
        given = " ".join(f"{k}={settings[k]}" for k in ("placement", "chunks") if k in settings)
        raise ScheduleError(
            f"header: {given} disagrees with the rows, which place "
            f"stages on ranks {placement.stage_to_rank} ({placement.shape}); fix the header "
            "or leave it out"
        )
    return placement


def _resolve(placement: Placement, row: list[_Cell]) -> list[Action]:
    """The actions of one row, each part's stage filled in and checked against the placement."""
    out = []
    for cell in row:
        parts = [_resolve_part(placement, cell, part) for part in cell.parts]
        out.append(overlap(*parts) if len(parts) == 2 else parts[0])
    return out


def _resolve_part(placement: Placement, cell: _Cell, part: Part) -> Action:
    rank, column = cell.rank, cell.column
    stage, kind, mb = part
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
    return Action(stage, kind, mb)


def _check_actions(
    rows: dict[int, list[_Cell]], actions: dict[int, list[Action]], placement: Placement, m: int
) -> None:
    """Per-cell range and duplicate checks, then that every needed action appears."""
    seen: dict[Action, tuple[int, int]] = {}  # action -> (rank, column)
    for rank, acts in actions.items():
        for cell, action in zip(rows[rank], acts, strict=True):
            column = cell.column
            for a in action.parts:
                if a.microbatch >= m:
                    raise ScheduleError(
                        f"rank {rank}, column {column}: microbatch {a.microbatch} is out of range "
                        f"0..{m - 1} (microbatches={m})"
                    )
                if a in seen:
                    raise ScheduleError(
                        f"rank {rank}, column {column}: {a} appears twice (also column "
                        f"{seen[a][1]})"
                    )
                seen[a] = (rank, column)
    # the same rule as validate.check_coverage: F always; unless forward-only, B or I and W
    backward = any(a.kind is not Kind.F for a in seen)
    for stage in range(placement.num_stages):
        rank = placement.rank_of(stage)
        for mb in range(m):
            full = Action(stage, Kind.B, mb)
            split = [a for a in (Action(stage, Kind.I, mb), Action(stage, Kind.W, mb)) if a in seen]
            if full in seen and split:
                raise ScheduleError(
                    f"rank {rank}, column {seen[split[0]][1]}: {split[0]} splits the backward "
                    f"that {full} (column {seen[full][1]}) runs whole; keep one B, or one I and "
                    "one W"
                )
            needed = [Action(stage, Kind.F, mb)]
            if split:
                needed += [Action(stage, Kind.I, mb), Action(stage, Kind.W, mb)]
            elif backward:
                needed.append(full)
            for a in needed:
                if a not in seen:
                    raise ScheduleError(
                        f"rank {rank}: the table never runs {a}; add it to rank {rank}'s row"
                    )
