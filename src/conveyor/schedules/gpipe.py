"""GPipe: all forwards, then all backwards (Huang et al., 2019).

Clock table for 3 ranks, 4 microbatches (F = forward, B = backward; unit costs)::

    rank 0: F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
    rank 1: .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
    rank 2: .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .

Every rank stashes all m microbatches' activations at its peak.
"""

from __future__ import annotations

from .ir import B, F, Placement, Schedule

__all__ = ["gpipe"]


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """GPipe schedule: rank r runs F of every microbatch on stage r, then every B."""
    placement = Placement.looped(num_ranks)
    actions = {
        r: [F(r, m) for m in range(num_microbatches)] + [B(r, m) for m in range(num_microbatches)]
        for r in range(num_ranks)
    }
    return Schedule.build("gpipe", num_microbatches, placement, actions)
