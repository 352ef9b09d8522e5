"""Pipeline schedules as data: per-rank action lists, validated, lowered, simulated.

Nothing in this package imports torch.
"""

from __future__ import annotations

from .controllable import v_half, v_min
from .describe import describe
from .dualpipe import dualpipev
from .forward_only import forward_only
from .gpipe import gpipe
from .interleaved import interleaved_1f1b
from .ir import Action, Kind, Placement, Schedule, ScheduleError, overlap
from .lower import lower
from .one_f_one_b import one_f_one_b
from .registry import SCHEDULE_CHUNKS, SCHEDULES, build_schedule, check_virtual_stages
from .table_file import format_schedule_csv, read_schedule_csv, write_schedule_csv
from .validate import DeadlockError, ScheduleStats, execute, validate
from .zero_bubble import zb_h1, zb_h2, zb_v

__all__ = [
    "Action",
    "DeadlockError",
    "Kind",
    "Placement",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "SCHEDULES",
    "SCHEDULE_CHUNKS",
    "build_schedule",
    "check_virtual_stages",
    "describe",
    "dualpipev",
    "execute",
    "format_schedule_csv",
    "forward_only",
    "gpipe",
    "interleaved_1f1b",
    "lower",
    "one_f_one_b",
    "overlap",
    "read_schedule_csv",
    "v_half",
    "v_min",
    "validate",
    "write_schedule_csv",
    "zb_h1",
    "zb_h2",
    "zb_v",
]
