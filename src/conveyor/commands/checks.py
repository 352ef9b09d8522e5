"""Checks of command-line values shared by the subcommands, made before any work starts."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

__all__ = ["positive", "output_file", "output_dir"]


def positive(value: float | None, flag: str, *, integer: bool = True) -> None:
    """ConfigError unless ``value`` (given to ``flag``) is None or a finite number > 0."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")) or value <= 0:
        kind = "a positive integer" if integer else "a finite number > 0"
        raise ConfigError(f"{flag.lstrip('-').replace('-', '_')}={value!r} must be {kind}; "
                          f"pass {flag} {'1' if integer else '60'} or more")


def _parent_ok(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"{flag} {path}: {above} is a file, not a directory; "
                                  "pass a path in a directory")
            return


def output_file(path: Path | str, flag: str) -> Path:
    """``path`` if a file can be written there: not a directory, no file in the way above."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file name (e.g. {path}/out.png)")
    _parent_ok(path, flag)
    return path


def output_dir(path: Path | str, flag: str) -> Path:
    """``path`` if a directory can be created or filled there (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; pass a directory to write into")
    _parent_ok(path, flag)
    return path
