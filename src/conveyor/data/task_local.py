"""Two fine-tuning tasks built from this interpreter's standard library: no download.

``stdlib-package`` (classification): a chunk of a stdlib source file -> the top-level
package it belongs to. The label is the first directory of the file's path under the
stdlib root (``email/mime/text.py`` -> ``email``): what ``import`` itself says about the
file, so no label is a judgement call. The classes are the ``PACKAGES`` packages with
the most files (single-file modules are no classes: a class needs files on both sides
of the split). Each file gives up to ``CHUNKS_PER_FILE`` chunks of ``CHUNK_LINES``
non-blank lines spread over it, so long files do not drown short ones; chunks are cut
to the model's context by the task itself (the encoder keeps the first tokens).

``docstring`` (seq2seq): a function's source with its docstring removed -> the first
line of its docstring (``ast`` over every stdlib file the corpus reads; functions
without a docstring, with a one-line body or a first line longer than
``MAX_TARGET_CHARS`` are skipped). Long functions exceed a small context: pass
``--truncate`` to keep their first tokens.

Each record's document is its file, so ``tasks.split_documents`` keeps a file in one split.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections import Counter
from pathlib import Path

from .corpus import stdlib_corpus_paths

__all__ = ["BUILTIN", "CHUNKS_PER_FILE", "CHUNK_LINES", "MAX_TARGET_CHARS", "PACKAGES",
           "build_local_task", "docstring_examples", "package_chunks"]

BUILTIN = ("stdlib-package", "docstring")
"""The task names ``--task`` accepts besides a .jsonl path."""

PACKAGES = 8
"""Classes of stdlib-package: the packages with the most files."""
CHUNK_LINES = 12
"""Non-blank lines per stdlib-package chunk."""
CHUNKS_PER_FILE = 4
"""Most chunks taken from one file."""
MAX_TARGET_CHARS = 80
"""Longest docstring first line the docstring task keeps."""

Row = tuple[str, str, str]
"""(input text, label or target, document)."""


def _root(paths: list[Path]) -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]) if paths else Path()


def package_chunks(paths: list[Path], root: Path, *, packages: int = PACKAGES) -> list[Row]:
    """(chunk, package, file) rows of the ``packages`` packages with the most files under root."""
    package_of = {p: p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1}
    counts = Counter(package_of.values())
    chosen = {name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:packages]}
    rows: list[Row] = []
    for path, package in sorted(package_of.items()):
        if package not in chosen:
            continue
        lines = [ln for ln in _read(path).splitlines() if ln.strip()]
        starts = range(0, max(1, len(lines) - CHUNK_LINES + 1), CHUNK_LINES)
        picked = list(starts)
        if len(picked) > CHUNKS_PER_FILE:  # evenly spread over the file
            step = len(picked) / CHUNKS_PER_FILE
            picked = [picked[int(i * step)] for i in range(CHUNKS_PER_FILE)]
        for s in picked:
            text = "\n".join(lines[s:s + CHUNK_LINES])
            if text.strip():
                rows.append((text, package, str(path.relative_to(root))))
    return rows


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def docstring_examples(source: str) -> list[tuple[str, str]]:
    """(function source without its docstring, first docstring line) of every documented function."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        body = node.body
        if doc is None or len(body) < 2 or body[0].lineno <= node.lineno:
            continue  # no docstring, nothing but it, or on the def line
        first = inspect.cleandoc(doc).strip().splitlines()
        if not first or not first[0].strip() or len(first[0].strip()) > MAX_TARGET_CHARS:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        doc_node = body[0]
        assert doc_node.end_lineno is not None and node.end_lineno is not None
        kept = lines[start:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        if code:
            out.append((code, first[0].strip()))
    return out


def build_local_task(name: str) -> tuple[str, list[Row], bool]:
    """(kind, rows, whether the task cuts inputs to the context) of a built-in task."""
    paths = stdlib_corpus_paths()
    root = _root(paths)
    if name == "stdlib-package":
        return "classification", package_chunks(paths, root), True
    assert name == "docstring", name
    rows = [(code, target, str(p.relative_to(root)))
            for p in paths for code, target in docstring_examples(_read(p))]
    return "seq2seq", rows, False
