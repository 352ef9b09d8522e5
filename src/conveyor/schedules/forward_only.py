"""Forward only: every rank runs the forward of each microbatch and nothing else.

For evaluation and inference: no B and no W, so nothing is stashed for a backward
and the validator reports peak activations of 0. Clock table, 3 ranks, 4
microbatches; makespan m + p - 1, bubble (p - 1) / (m + p - 1)::

    rank 0: F0 F1 F2 F3 .  .
    rank 1: .  F0 F1 F2 F3 .
    rank 2: .  .  F0 F1 F2 F3
"""

from __future__ import annotations

from .ir import F, Placement, Schedule, check_sizes

__all__ = ["forward_only"]


def forward_only(num_ranks: int, num_microbatches: int) -> Schedule:
    """Forward-only schedule: rank r runs F of every microbatch on stage r, in order."""
    check_sizes("forward-only", num_ranks, num_microbatches)
    actions = {r: [F(r, i) for i in range(num_microbatches)] for r in range(num_ranks)}
    return Schedule.build("forward-only", num_microbatches, Placement.looped(num_ranks), actions)
