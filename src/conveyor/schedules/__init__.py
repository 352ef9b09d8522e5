"""Pipeline schedules as data: per-rank action lists, validated, lowered, simulated.

Nothing in this package imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

from .gpipe import gpipe
from .ir import Action, Kind, Placement, Schedule, ScheduleError
from .lower import lower
from .one_f_one_b import one_f_one_b
from .validate import ScheduleStats, execute, validate

__all__ = [
    "Action",
    "Kind",
    "Placement",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "SCHEDULES",
    "build_schedule",
    "execute",
    "gpipe",
    "lower",
    "one_f_one_b",
    "validate",
]

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Build a registered schedule by name."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(
            f"schedule {name!r} is unknown; choose one of {', '.join(sorted(SCHEDULES))}"
        ) from None
    return fn(num_ranks, num_microbatches)
