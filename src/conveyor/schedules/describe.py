"""A schedule in words and tables, for ``conveyor schedule show``.

Shows what the schedule is (ranks, stages, placement), each rank's action list, the
clock table under unit costs, and the validator's figures.
"""

from __future__ import annotations

from .concurrency import core_shares
from .ir import Kind, Schedule
from .validate import execute, validate

__all__ = ["describe"]


def describe(schedule: Schedule) -> str:
    """Action table, unit-cost clock table, bubble, makespan and peak activations, as text.

    Raises ScheduleError (from the validator) if the schedule cannot run.
    """
    stats = validate(schedule)
    run = execute(schedule)
    p, n = schedule.num_ranks, schedule.num_stages
    kinds = {p.kind for p in schedule.parts()}
    if schedule.forward_only:
        backward, costs = "forward only (no backward)", "F = 1"
    elif Kind.B in kinds and Kind.I in kinds:
        backward, costs = "B = full backward, I = input grad, W = weight grad", "F = B = I = W = 1"
    elif Kind.I in kinds:
        backward, costs = "I = input grad, W = weight grad", "F = I = W = 1"
    else:
        backward, costs = "B = full backward", "F = B = 1"
    per_rank = ", ".join(f"rank {r}: {k}" for r, k in sorted(stats.peak_activations.items()))
    lines = [
        f"schedule {schedule.name!r}{' (lowered)' if schedule.lowered else ''}: "
        f"{p} rank{'s' if p != 1 else ''}, {n} stage{'s' if n != 1 else ''} "
        f"({schedule.placement.shape} placement), {schedule.num_microbatches} microbatches; "
        f"{backward}",
        "",
        "actions per rank:",
        schedule.table(),
        "",
        f"clock, unit costs {costs} ('.' = idle):",
        run.clock_table(),
        "",
        f"makespan: {stats.makespan:g}",
        f"bubble fraction: {stats.bubble_fraction:.4f} (idle share of ranks x makespan)",
        f"steady bubble fraction: {stats.steady_bubble_fraction:.4f} "
        "(idle inside each rank's first-to-last action)",
        f"peak activations, in stage-microbatches held (F done, B or W not yet): {per_rank}",
    ]
    if not schedule.lowered:
        lent = ", ".join(f"rank {r}: " + " ".join(f"{a} x{k}" for a, k in row.items())
                         for r, row in sorted(core_shares(schedule).items()) if row)
        # what --lend-cores does: actions during which other ranks must be idle, and the
        # ranks' worth of threads each takes (schedules.concurrency)
        lines.append(f"cores lent by idle ranks (--lend-cores, on CPU): {lent or 'none'}")
    return "\n".join(lines)
