"""Subcommands of the ``conveyor`` CLI, one module each, each with ``register(subparsers)``.

A module's ``register`` adds its parser and sets ``run=<function(args) -> int>``.
"""

from __future__ import annotations

from ..config import ConfigError
from ..data.errors import DataError
from ..generation import GenerationError
from ..schedules.ir import ScheduleError
from ..train.checkpoint import CheckpointError

__all__ = ["COMMANDS", "UserError"]

# Modules under conveyor.commands, in the order --help lists them (import_ adds `import`).
COMMANDS = ["train", "finetune", "eval", "report", "generate", "predict", "export", "import_", "schedule", "simulate",
            "trace", "plan"]

UserError = (ConfigError, DataError, ScheduleError, CheckpointError, GenerationError,
             FileNotFoundError)
"""Errors that are the user's to fix: printed as one line, exit status 2."""
