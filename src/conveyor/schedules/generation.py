"""Generation as a forward-only schedule: rounds of decoding around a ring of ranks.

One *round* runs every model stage once on a microbatch and samples one token per
sequence: the prompt (prefill) in the first round, the previous token in each
later one. Round ``t`` of model stage ``s`` is virtual stage ``t * p + s`` on rank
``s``, so the sampled token is what crosses from the last rank back to rank 0 to
start the next round, an ordinary boundary of the IR. After the last round,
``p - 1`` relay stages (ranks 0 .. p-2) pass the segment's tokens on, so every
rank knows them and all agree on which sequences have finished.

A rank runs its rounds in order and, in each, every microbatch in order, so with
m >= p microbatches the ring stays full: while rank 1 decodes microbatch A, rank 0
decodes microbatch B. Clock table, p = 2, m = 2, two rounds (stage 4 is the
relay); makespan R*m + p and more, bubble only at the ends::

    rank 0: 0F0 0F1 2F0 2F1 4F0 4F1
    rank 1: .   1F0 1F1 3F0 3F1 .

What crosses each cut (:meth:`GenerationSegment.crossing`): hidden states within
a round, one token (``next``) from a round to the next, and every token of the
segment (``tokens``) into and along the relay.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import F, Placement, Schedule, ScheduleError, check_sizes

__all__ = ["GenerationSegment", "generation_segment"]

HIDDEN, NEXT, TOKENS = "hidden", "next", "tokens"


@dataclass(frozen=True)
class GenerationSegment:
    """The shape of ``rounds`` rounds of generation over ``num_ranks`` model stages."""

    num_ranks: int
    rounds: int

    @property
    def num_stages(self) -> int:
        """Virtual stages: one per (round, model stage), then the relays."""
        return self.rounds * self.num_ranks + self.num_ranks - 1

    def round_of(self, stage: int) -> int | None:
        """The round virtual ``stage`` belongs to, or None for a relay."""
        t = stage // self.num_ranks
        return t if t < self.rounds else None

    def model_stage(self, stage: int) -> int:
        """The model stage (= rank) of virtual ``stage``."""
        return stage % self.num_ranks

    def crossing(self, boundary: int) -> str:
        """What crosses the cut after virtual stage ``boundary``: hidden, next or tokens."""
        p, last_round_end = self.num_ranks, self.rounds * self.num_ranks - 1
        if boundary >= last_round_end:
            return TOKENS
        return NEXT if boundary % p == p - 1 else HIDDEN


def generation_segment(num_ranks: int, rounds: int, num_microbatches: int) -> Schedule:
    """Forward-only schedule of ``rounds`` generation rounds of every microbatch, then the relay."""
    check_sizes("generation", num_ranks, num_microbatches)
    if rounds < 1:
        raise ScheduleError(f"a generation segment needs rounds >= 1: got rounds={rounds}")
    seg = GenerationSegment(num_ranks, rounds)
    placement = Placement(tuple(seg.model_stage(v) for v in range(seg.num_stages)))
    actions = {
        r: [F(v, i) for v in placement.stages_of(r) for i in range(num_microbatches)]
        for r in range(num_ranks)
    }
    return Schedule.build("generation", num_microbatches, placement, actions)
