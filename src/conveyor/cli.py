"""The ``conveyor`` command line: one subcommand per module in ``conveyor.commands``.

Every failure ends in one line on stderr, ``conveyor CMD: error: ...``, and a non-zero
exit: 2 for the user's mistakes (bad flags, config, data, checkpoint, paths), 1 for a
rank that died or anything unexpected, 130/143 after SIGINT/SIGTERM. ``--debug`` (or
``CONVEYOR_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .commands import COMMANDS, UserError
from .runtime.launch import Preempted, RankDied

__all__ = ["main", "build_parser", "debug_enabled"]

DEBUG_ENV = "CONVEYOR_DEBUG"
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer")
_RAISED = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Timeout)): (.*)$")


class _UsageError(Exception):
    """A flag argparse rejected; carries the parser's name for the one-line message."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and its --help) instead of the usage."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = _Parser(
        prog="conveyor",
        description="Pipeline-parallel training of transformer language models on PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show full tracebacks instead of one-line errors (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"conveyor.commands.{name}").register(sub)
    return parser


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """True when full tracebacks were asked for (``--debug`` or CONVEYOR_DEBUG=1)."""
    flag = "--debug" in (sys.argv[1:] if argv is None else argv)
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _os_error(err: OSError) -> str:
    path = err.filename if err.filename is not None else ""
    what = f"{path}: " if path else ""
    return (f"{what}{err.strerror or err} (check that the path exists, is the right kind "
            "(file or directory), is writable and that the disk has space)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conveyor`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, before or after COMMAND
    name = "conveyor"
    try:
        args = build_parser().parse_args(argv)
        name = f"conveyor {args.command}"
        return int(args.run(args) or 0)
    except _UsageError as err:
        if debug:
            raise
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        if debug:
            raise
        print(f"{name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place every error becomes one line)
        if debug:
            raise
        code, line = _describe(err)
        print(f"{name}: error: {line}", file=sys.stderr)
        return code


def _describe(err: Exception) -> tuple[int, str]:
    """(exit status, one line) for an error that reached the top."""
    if isinstance(err, UserError):
        return 2, str(err)
    if isinstance(err, RankDied):  # torch's own report is ~20 lines for the same fact
        return 1, str(err)
    if isinstance(err, OSError):
        return 2, _os_error(err)
    lines = str(err).strip().splitlines() or [""]
    last = lines[-1]
    # a rank's traceback ends with "module.Error: first line" and the message's other lines
    raised = [m for m in map(_RAISED.match, lines) if m] if hasattr(err, "error_index") else []
    if raised:
        name, first = raised[-1].group(1).rsplit(".", 1)[-1], raised[-1].group(2)
        return 1, (f"rank {err.error_index}: {name}: {first} (rerun with --debug for the "
                   "traceback)")
    if isinstance(err, RuntimeError) and any(s in last for s in _PEER_GONE):
        return 1, ("lost the connection to another rank: it died or was stopped (its own "
                   "output says why); `conveyor train --resume auto` continues from the newest "
                   "checkpoint")
    where = f"rank {err.error_index}: " if hasattr(err, "error_index") else ""
    return 1, (f"{where}{type(err).__name__}: {last} (unexpected; rerun with --debug for the "
               "traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
