"""1F1B, also called PipeDream-Flush (Narayanan et al., 2021).

Rank r runs ``p - 1 - r`` warm-up forwards, then alternates one forward with one
backward, then drains the remaining backwards. Same bubble as GPipe, but a rank
never stashes more than ``p - r`` microbatches instead of ``m``.

Clock table for 3 ranks, 4 microbatches (unit costs)::

    rank 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    rank 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    rank 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .
"""

from __future__ import annotations

from .ir import Action, B, F, Placement, Schedule

__all__ = ["one_f_one_b"]


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B schedule for ``num_ranks`` stages (one per rank) and ``num_microbatches``."""
    placement = Placement.looped(num_ranks)
    m = num_microbatches
    actions: dict[int, list[Action]] = {}
    for r in range(num_ranks):
        warmup = min(num_ranks - 1 - r, m)
        acts = [F(r, i) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [F(r, warmup + i), B(r, i)]
        acts += [B(r, i) for i in range(m - warmup, m)]
        actions[r] = acts
    return Schedule.build("1f1b", m, placement, actions)
