"""Fine-tuning tasks as records: read from .jsonl, or built from the local stdlib, then split.

A task is classification (records with ``text`` and ``label``) or seq2seq (``source`` and
``target``). ``load_task`` selects one by name (``BUILTIN``, see ``data.task_local``) or by
path, and returns its train and validation records, deterministic given the seed:

- a built-in task is split by document (a file never appears in two splits);
- a .jsonl file is split by record (``val_fraction``), unless a second file gives the
  validation records.

Every record is checked on reading: one DataError line names the file, the line and
the fix (a missing field, a value that is not a non-empty string).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import DataError
from .task_local import BUILTIN, build_local_task

__all__ = ["BUILTIN", "FIELDS", "Record", "TaskData", "check_labels", "load_task", "read_inputs",
           "read_records", "split_documents"]

Kind = Literal["classification", "seq2seq"]

FIELDS: dict[str, tuple[str, str]] = {"classification": ("text", "label"),
                                      "seq2seq": ("source", "target")}
"""The two fields of a record of each kind: (input, output)."""


@dataclass(frozen=True)
class Record:
    """One example: the input text, the label or target text, and the document it came from."""

    text: str
    output: str
    doc: str = ""


@dataclass(frozen=True)
class TaskData:
    """A task's records, split; ``labels`` are the training labels, sorted (classification)."""

    name: str
    kind: Kind
    train: list[Record]
    val: list[Record]
    labels: tuple[str, ...] = ()
    truncate: bool = False
    """Whether the task itself cuts its inputs to the context (the built-in chunks)."""


def _kind_of(record: dict, where: str) -> Kind:
    if "source" in record or "target" in record:
        return "seq2seq"
    if "text" in record or "label" in record:
        return "classification"
    raise DataError(f"{where}: a record needs \"text\" and \"label\" (classification) or "
                    f"\"source\" and \"target\" (seq2seq) fields, got {sorted(record)[:5]}")


def _field(record: dict, name: str, where: str, *, label: bool = False) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}; every record of this file needs it")
    value = record[name]
    if label and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # integer class ids are labels too
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        what = "an empty target" if name == "target" else f"an empty {name!r}"
        raise DataError(f"{where}: {what}; remove the record or fill the field")
    return value


def read_records(path: Path, kind: Kind | None = None) -> tuple[Kind, list[Record]]:
    """The records of a .jsonl file and their kind (read off the first record unless given)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"task file {path} does not exist; pass a .jsonl file or a task "
                        f"name ({', '.join(BUILTIN)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read task file {path} ({err}); pass a UTF-8 .jsonl file") from None
    records: list[Record] = []
    for where, raw in _objects(path, lines):
        kind = kind or _kind_of(raw, where)
        first, second = FIELDS[kind]
        records.append(Record(_field(raw, first, where),
                              _field(raw, second, where, label=kind == "classification")))
    if not records or kind is None:
        raise DataError(f"task file {path} holds no records; add one JSON object per line")
    return kind, records


def _objects(path: Path, lines: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``path:line``, object) of each non-blank line; DataError naming a line that is none."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not a JSON object ({err.msg}); one record per line") from None
        if not isinstance(raw, dict):
            raise DataError(f"{where}: not a JSON object; one record per line")
        yield where, raw


def read_inputs(path: Path) -> list[Record]:
    """Records to classify: a ``text`` each, and a ``label`` where known (else empty)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read --input {path} ({err}); pass a UTF-8 .jsonl file") from None
    for where, raw in _objects(path, lines):
        label = _field(raw, "label", where, label=True) if "label" in raw else ""
        records.append(Record(_field(raw, "text", where), label))
    if not records:
        raise DataError(f"--input {path} holds no records; add one JSON object per line")
    return records


def split_documents(docs: list[str], val_fraction: float, seed: int) -> set[str]:
    """The documents held out for validation: a seeded share, at least one (if there are two)."""
    order = sorted(set(docs))
    if len(order) < 2 or val_fraction <= 0:
        return set()
    perm = np.random.default_rng(seed).permutation(len(order))
    n = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return {order[i] for i in perm[:n]}


def _split_records(records: list[Record], val_fraction: float, seed: int
                   ) -> tuple[list[Record], list[Record]]:
    perm = np.random.default_rng(seed).permutation(len(records))
    n = min(len(records) - 1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    held = set(perm[:n].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def check_labels(labels: tuple[str, ...], records: list[Record], where: str) -> None:
    """DataError naming the first label of ``records`` that training never saw."""
    known = set(labels)
    for i, r in enumerate(records):
        if r.output not in known:
            shown = ", ".join(labels[:8]) + (" ..." if len(labels) > 8 else "")
            raise DataError(f"{where}: record {i} has label {r.output!r}, unseen in training "
                            f"(labels: {shown}); use the training labels or fine-tune with it")


def load_task(task: str, *, val_task: str | None = None, val_fraction: float = 0.1,
              seed: int = 0) -> TaskData:
    """The named built-in task, or the records of a .jsonl path, split into train and val."""
    if task in BUILTIN:
        if val_task is not None:
            raise DataError(f"--val-task is for a .jsonl --task; the built-in task {task!r} "
                            "splits itself by document")
        kind, rows, truncate = build_local_task(task)
        records = [Record(*row) for row in rows]
        held = split_documents([r.doc for r in records], val_fraction, seed)
        train = [r for r in records if r.doc not in held]
        val = [r for r in records if r.doc in held]
    else:
        if not task.endswith(".jsonl") and not Path(task).exists():
            raise DataError(f"--task {task!r} is no task name ({', '.join(BUILTIN)}) and no "
                            "file; pass one of those or a .jsonl path")
        kind, records = read_records(Path(task))
        truncate = False
        if val_task is not None:
            train, val = records, read_records(Path(val_task), kind)[1]
        else:
            train, val = _split_records(records, val_fraction, seed)
    labels: tuple[str, ...] = ()
    if kind == "classification":
        labels = tuple(sorted({r.output for r in train}))
        if len(labels) < 2:
            raise DataError(f"--task {task}: the training records hold {len(labels)} label(s); "
                            "classification needs two or more")
        check_labels(labels, val, f"--task {task} validation")
    name = task if task in BUILTIN else Path(task).name
    return TaskData(name, kind, train, val, labels, truncate)
