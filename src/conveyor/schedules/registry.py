"""Schedules by name, and how many model chunks per rank each one runs.

Config and the CLI pick a schedule by name; this is the one place that maps names
to the pure functions that build them. Nothing downstream dispatches on the name.
"""

from __future__ import annotations

from collections.abc import Callable

from .controllable import v_half, v_min
from .dualpipe import dualpipev
from .forward_only import forward_only
from .gpipe import gpipe
from .interleaved import interleaved_1f1b
from .ir import Schedule, ScheduleError, check_sizes
from .one_f_one_b import one_f_one_b
from .zero_bubble import zb_h1, zb_h2, zb_v

__all__ = ["SCHEDULES", "SCHEDULE_CHUNKS", "build_schedule", "check_virtual_stages"]

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "dualpipev": dualpipev,
    "v-half": v_half,
    "v-min": v_min,
    "forward-only": forward_only,
}
"""Name -> ``fn(num_ranks, num_microbatches)``; interleaved also takes ``virtual_stages``."""

SCHEDULE_CHUNKS: dict[str, int | None] = {
    "gpipe": 1,
    "1f1b": 1,
    "interleaved-1f1b": None,
    "zb-h1": 1,
    "zb-h2": 1,
    "zb-v": 2,
    "dualpipev": 2,
    "v-half": 2,
    "v-min": 2,
    "forward-only": 1,
}
"""Name -> model chunks (virtual stages) per rank it runs; None: any ``virtual_stages >= 2``.

The pipeline has ``num_ranks * chunks`` stages in all.
"""


def check_virtual_stages(name: str, virtual_stages: int) -> None:
    """Raise ScheduleError unless schedule ``name`` can run ``virtual_stages`` chunks per rank."""
    chunks = _chunks(name)
    if chunks is None:
        if virtual_stages < 2:
            raise ScheduleError(
                f"schedule {name!r} needs virtual_stages >= 2 model chunks per rank: got "
                f"virtual_stages={virtual_stages}; set virtual_stages=2 or more, or use '1f1b'"
            )
    elif virtual_stages != chunks:
        hint = " or use 'interleaved-1f1b'" if chunks == 1 and virtual_stages >= 2 else ""
        raise ScheduleError(
            f"schedule {name!r} runs exactly {chunks} model chunk{'s' if chunks > 1 else ''} "
            f"per rank: got virtual_stages={virtual_stages}; set virtual_stages={chunks}{hint}"
        )


def build_schedule(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1
) -> Schedule:
    """Build a registered schedule by name, with ``virtual_stages`` model chunks per rank."""
    check_virtual_stages(name, virtual_stages)
    check_sizes(name, num_ranks, num_microbatches)
    fn = SCHEDULES[name]
    if SCHEDULE_CHUNKS[name] is None:
        return fn(num_ranks, num_microbatches, virtual_stages)
    return fn(num_ranks, num_microbatches)


def _chunks(name: str) -> int | None:
    try:
        return SCHEDULE_CHUNKS[name]
    except KeyError:
        raise ScheduleError(
            f"schedule {name!r} is unknown; choose one of {', '.join(sorted(SCHEDULES))}"
        ) from None
