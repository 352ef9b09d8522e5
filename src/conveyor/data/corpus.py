"""Text corpora: the stdlib default, user paths, and reading them into documents.

A *document* is one unit of text that packing separates from the next with an
end-of-text token: one whole file for plain text, one record for JSON/JSONL, one
row's ``text`` for Parquet and Arrow tables (read with pyarrow, local files only).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.data.errors import DataError

__all__ = ["Corpus", "stdlib_corpus_paths", "resolve_paths", "read_documents"]

log = logging.getLogger("conveyor.data")

# Test suites are about half the stdlib's bytes, are repetitive, and hold deliberately
# malformed-encoding fixtures; installed third-party packages are not the stdlib.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

# Inside a directory spec these are skipped silently (not warned about): they are never text.
BINARY_SUFFIXES = frozenset(
    ".pyc .pyo .so .o .a .dll .dylib .exe .bin .png .jpg .jpeg .gif .bmp .ico .webp .pdf"
    " .zip .gz .bz2 .xz .zst .tar .tgz .7z .whl .npy .npz .pt .pth .ckpt .safetensors"
    " .db .sqlite".split()
)
TABLE_SUFFIXES = frozenset({".parquet", ".arrow", ".feather"})
"""Columnar files read with pyarrow: each row's ``text`` column is a document."""

_GLOB_CHARS = frozenset("*?[")
_JSON_SUFFIXES = frozenset({".json", ".jsonl"})
_DATA_FIX = "pass an existing file, directory or glob to --data"


@dataclass
class Corpus:
    """Documents read from files, the files skipped, and a fingerprint of the text."""

    documents: list[str]
    """Non-empty documents in a deterministic order (path order, then record order)."""
    skipped: list[Path] = field(default_factory=list)
    """Files not read because they are binary (hold NUL bytes) or not valid UTF-8."""
    fingerprint: str = ""
    """sha256 hex digest of the documents; changes whenever the text changes."""


def stdlib_corpus_paths() -> list[Path]:
    """The running interpreter's stdlib ``*.py`` files, sorted; test suites and packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        found.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _walk_dir(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() not in BINARY_SUFFIXES:
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def resolve_paths(specs: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursive, hidden and binary-suffix files left out) and globs."""
    if not specs:
        raise DataError("no data paths given; pass a file, directory or glob to --data")
    paths: list[Path] = []
    for spec in specs:
        if any(c in _GLOB_CHARS for c in spec) and not Path(spec).exists():
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            if not matches:
                raise DataError(f"data glob '{spec}' matched no files; {_DATA_FIX}")
        else:
            matches = [Path(spec)]
        for match in matches:
            if match.is_dir():
                files = _walk_dir(match)
                if not files:
                    raise DataError(f"data directory '{match}' holds no files; {_DATA_FIX}")
                paths.extend(files)
            elif match.is_file():
                paths.append(match)
            elif not match.exists():
                raise DataError(f"data path '{spec}' does not exist; {_DATA_FIX}")
            else:
                raise DataError(f"data path '{match}' is not a regular file; {_DATA_FIX}")
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _text_field(record: Any, path: Path, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(
            f"'{path}' {where} is a JSON {type(record).__name__}, not an object; "
            'write one object with a "text" string field per record'
        )
    if "text" not in record:
        keys = ", ".join(sorted(map(str, record))[:5]) or "none"
        raise DataError(
            f"'{path}' {where} has no \"text\" field (fields: {keys}); "
            'give every record a "text" string field'
        )
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(
            f"'{path}' {where} has a \"text\" field of type {type(text).__name__}; "
            'make every "text" field a string'
        )
    return text


def _table_records(path: Path) -> list[str]:
    """The ``text`` column of a Parquet file or an Arrow IPC file/stream (HF datasets' .arrow)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow; pip install 'conveyor[arrow]' "
                        "(or pyarrow), or convert it to .jsonl") from None
    try:
        if path.suffix.lower() == ".parquet":
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=["text"]) if "text" in names else None
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:  # not the file format: the stream format
                    source.seek(0)
                    table = pa.ipc.open_stream(source).read_all()
            names = table.column_names
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read table '{path}' ({err}); pass a Parquet or Arrow file "
                        "with a \"text\" column") from None
    if table is None or "text" not in names:
        raise DataError(f"'{path}' has no \"text\" column (columns: "
                        f"{', '.join(names[:5]) or 'none'}); give the table a \"text\" column")
    column = table.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"'{path}' has a \"text\" column of type {column.type}; make it a "
                        "string column")
    return [t for t in column.to_pylist() if t is not None]


def _json_records(text: str, path: Path) -> list[str]:
    """Parse the layouts HF ``datasets``' json loader reads: JSON Lines or a list of objects."""
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines saved as .json, which HF also accepts
        if isinstance(data, list):
            return [_text_field(r, path, f"record {i}") for i, r in enumerate(data)]
        if isinstance(data, dict) and isinstance(data.get("text"), list):
            columns = data["text"]  # a dict of columns: {"text": [...], ...}
            return [_text_field({"text": t}, path, f"record {i}") for i, t in enumerate(columns)]
        if isinstance(data, dict):
            return [_text_field(data, path, "record 0")]
    records: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"'{path}' line {lineno} is not valid JSON ({exc.msg}); "
                "write one JSON object per line (JSON Lines) or a JSON list of objects"
            ) from None
        records.append(_text_field(record, path, f"line {lineno}"))
    return records


def _describe(paths: Sequence[Path]) -> str:
    if len(paths) == 1:
        return f"1 file '{paths[0]}'"
    try:
        where = os.path.commonpath([str(p) for p in paths])
    except ValueError:  # mixed drives or absolute/relative
        where = str(paths[0].parent)
    return f"{len(paths)} files under '{where or '.'}'"


def read_documents(paths: Iterable[Path], *, limit_bytes: int | None = None) -> Corpus:
    """Read text files into documents, skipping binary/non-UTF-8 files with one warning.

    ``limit_bytes`` stops reading further files once that many bytes have been read
    (whole files only, in path order); None reads everything.
    """
    paths = list(paths)
    documents: list[str] = []
    skipped: list[Path] = []
    read: list[Path] = []
    total = 0
    for path in paths:
        if limit_bytes is not None and total >= limit_bytes:
            break
        if path.suffix.lower() in TABLE_SUFFIXES:
            read.append(path)
            texts = _table_records(path)
            total += sum(len(t) for t in texts)
            documents.extend(t for t in texts if t.strip())
            continue
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read data file '{path}' ({exc.strerror}); "
                            "check it exists and is readable") from None
        read.append(path)
        if b"\x00" in raw:
            skipped.append(path)
            continue
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            skipped.append(path)
            continue
        total += len(raw)
        texts = _json_records(text, path) if path.suffix.lower() in _JSON_SUFFIXES else [text]
        documents.extend(t for t in texts if t.strip())
    if skipped:
        names = ", ".join(p.name for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d of %d data files that are binary or not UTF-8: %s%s",
                    len(skipped), len(read), names, more)
    if not read:
        raise DataError(f"no data files to read; {_DATA_FIX}")
    if not documents:
        n_empty = len(read) - len(skipped)
        if not n_empty:
            reason = "all were binary or not UTF-8"
        elif not skipped:
            reason = "all were empty or whitespace"
        else:
            reason = f"{len(skipped)} were binary or not UTF-8, {n_empty} empty or whitespace"
        fix = "pass text files (UTF-8)" if not n_empty else "pass non-empty text files (UTF-8)"
        raise DataError(f"no usable text in {_describe(read)}: {reason}; {fix} to --data")
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return Corpus(documents=documents, skipped=skipped, fingerprint=digest.hexdigest())
