"""Interleaved 1F1B (Narayanan et al., 2021, Megatron-LM), for any microbatch count.

Each of the p ranks holds v model chunks on the looped placement: stage
``s = c * p + r`` (chunk c) lives on rank ``r = s % p``. A microbatch goes round
the ranks v times, so with chunks 1/v the size the warm-up and drain shrink v-fold.

Microbatches are taken in rounds. A round is a block of consecutive microbatches
that runs its forwards chunk by chunk (every microbatch of the round on chunk 0,
then on chunk 1, ...) and its backwards in reverse chunk order. Megatron uses
rounds of exactly p, which needs ``m % p == 0``. Here ``m`` is cut into
``max(1, m // p)`` rounds whose sizes differ by at most one, larger ones first. When
``p`` divides ``m`` this is Megatron's schedule exactly. Otherwise every round still
holds at least p microbatches, so a microbatch coming back to rank 0 for its next
chunk never finds the rank idle. Rank r runs ``2 * (p - 1 - r) + (v - 1) * g``
warm-up forwards (g = size of the first round), then alternates one forward with
one backward, then drains.

Under unit costs (each chunk's F = B = 1) the validator measures, for every m >= 1::

    makespan = 2 * (v * max(m, p) + min(m, p) - 1)
    bubble   = (p - 1) / (v * m + p - 1)           when m >= p

For m < p the single round is shorter than the loop, so ranks wait between chunks
and the bubble is ``1 - v*m / (v*p + m - 1)``.

Clock table for 2 ranks, 2 chunks, 4 microbatches (``2F0``: stage 2, forward of
microbatch 0; rank 0 holds stages 0 and 2, rank 1 holds 1 and 3)::

    rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    rank 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .
"""

from __future__ import annotations

from .ir import Action, B, F, Placement, Schedule, ScheduleError, check_sizes

__all__ = ["interleaved_1f1b"]

NAME = "interleaved-1f1b"


def interleaved_1f1b(
    num_ranks: int, num_microbatches: int, virtual_stages: int = 2
) -> Schedule:
    """Interleaved 1F1B with ``virtual_stages`` (>= 2) chunks per rank, any microbatch count."""
    check_sizes(NAME, num_ranks, num_microbatches)
    if not isinstance(virtual_stages, int) or virtual_stages < 2:
        raise ScheduleError(
            f"schedule {NAME!r} needs virtual_stages >= 2 model chunks per rank: got "
            f"virtual_stages={virtual_stages!r}; use virtual_stages=2 or more, or schedule '1f1b'"
        )
    p, m, v = num_ranks, num_microbatches, virtual_stages
    rounds = _rounds(p, m)
    # (chunk, microbatch) in the order every rank runs them
    forwards = [(c, mb) for rnd in rounds for c in range(v) for mb in rnd]
    backwards = [(c, mb) for rnd in rounds for c in reversed(range(v)) for mb in rnd]
    total = v * m
    actions: dict[int, list[Action]] = {}
    for r in range(p):
        warmup = min(2 * (p - 1 - r) + (v - 1) * len(rounds[0]), total)
        acts = [F(c * p + r, mb) for c, mb in forwards[:warmup]]
        for (cf, mf), (cb, mb) in zip(forwards[warmup:], backwards, strict=False):
            acts += [F(cf * p + r, mf), B(cb * p + r, mb)]
        acts += [B(c * p + r, mb) for c, mb in backwards[total - warmup :]]
        actions[r] = acts
    return Schedule.build(NAME, m, Placement.looped(p, v), actions)


def _rounds(num_ranks: int, num_microbatches: int) -> list[range]:
    """Split microbatches into max(1, m // p) consecutive rounds, sizes within one, larger first."""
    count = max(1, num_microbatches // num_ranks)
    size, extra = divmod(num_microbatches, count)
    out, start = [], 0
    for i in range(count):
        n = size + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out
