"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).

The backward is split in two: B computes the gradient of the stage's input (the
next rank upstream waits for it) and W the gradient of its weights (nobody waits
for it). W can therefore be deferred into the time a rank would otherwise idle.

What "zero bubble" means here. The validator's ``bubble_fraction`` is
``1 - busy / (ranks * makespan)`` over one step. Rank r cannot start before r
forwards have reached it, so with F = B = W = 1 no schedule of single-stage ranks
beats a makespan of ``max(3m + p - 1, 2m + 2p - 1)``: rank p - 1 starts at p - 1
and has 3m units of work, and the microbatch whose B is last on rank p - 1 still
has p - 1 Bs and one W to go after it. That start-up skew is not idle time that a
schedule can remove; the next step's warm-up overlaps it once the optimizer step
does not synchronise the ranks (the paper's post-validation). So we report two
figures (both from :func:`conveyor.schedules.validate`):

* ``bubble_fraction``: the whole-step metric above;
* ``steady_bubble_fraction``: idle time inside each rank's own span, from its first
  action to its last. A schedule is *zero bubble* when this is exactly 0.

With F = B = W = 1 the validator measures, for p ranks and m microbatches:

======  =====================================  =============================  ==============
name    makespan (all m >= 1)                   bubble_fraction                steady = 0 iff
======  =====================================  =============================  ==============
zb-h1   max(3m + p - 1, 2m + 2p - 1)            (p-1)/(3m+p-1) for m >= p      p == 1
zb-h2   max(3m + p - 1, 2m + 2p - 1)            (p-1)/(3m+p-1) for m >= p      m >= 2p - 1
zb-v    max(6m + p - 1, 4m + 4p - 2)            (p-1)/(6m+p-1) for 2m >= 3p-1  m >= 2p - 1
======  =====================================  =============================  ==============

ZB-H1 and ZB-H2 reach the lower bound for every m; ZB-V reaches its own (rank p - 1
starts at p - 1 and has 6m units) once 2m >= 3p - 1.

Peak stashed activations (F done, B not yet) per rank: ZB-H1 equals 1F1B's,
``min(p - r, m)``; ZB-H2 adds up to p - 1 - r more (about twice 1F1B's on rank 0);
ZB-V stashes at most 2 * min(p, m) half-size chunks on every rank, i.e. at most
1F1B's rank-0 peak in memory.
"""

from __future__ import annotations

from .ir import Action, B, F, Placement, Schedule, W, check_sizes

__all__ = ["zb_h1", "zb_h2", "zb_v"]


def zb_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B's order of F and B, each rank r running every W r steps late.

    Same warm-up and so the same peak stashed activations as 1F1B; the deferred Ws
    fill the drain, cutting 1F1B's bubble to a third. Clock table, 3 ranks,
    4 microbatches::

        rank 0: F0 F1 F2 .  .  B0 W0 F3 B1 W1 B2 W2 B3 W3
        rank 1: .  F0 F1 .  B0 F2 B1 W0 F3 B2 W1 B3 W2 W3
        rank 2: .  .  F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3
    """
    check_sizes("zb-h1", num_ranks, num_microbatches)
    return _split_1f1b("zb-h1", num_ranks, num_microbatches, extra=0)


def zb_h2(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H2: ZB-H1 with up to p - 1 extra warm-up forwards, so no rank waits once started.

    Rank r runs ``e_r = min(p - 1 - r, x)`` more warm-up forwards and defers its Ws by
    ``min(r, x)`` more steps, where ``x = min(p - 1, max(0, m - p))``; for m <= p it is
    ZB-H1. From m >= 2p - 1 every rank is busy from its first action to its last (the
    paper's parallelogram). Clock table, 3 ranks, 5 microbatches::

        rank 0: F0 F1 F2 F3 F4 B0 W0 B1 W1 B2 W2 B3 W3 B4 W4 .  .
        rank 1: .  F0 F1 F2 B0 F3 B1 F4 B2 W0 B3 W1 B4 W2 W3 W4 .
        rank 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 W0 W1 W2 W3 W4
    """
    check_sizes("zb-h2", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    return _split_1f1b("zb-h2", p, m, extra=min(p - 1, max(0, m - p)))


def _split_1f1b(name: str, p: int, m: int, extra: int) -> Schedule:
    actions: dict[int, list[Action]] = {}
    for r in range(p):
        warmup = min(p - 1 - r + min(p - 1 - r, extra), m)
        lag = r + min(r, extra)  # W of microbatch i runs after B of microbatch i + lag
        acts = [F(r, i) for i in range(warmup)]
        for i in range(m):
            if warmup + i < m:
                acts.append(F(r, warmup + i))
            acts.append(B(r, i))
            if i >= lag:
                acts.append(W(r, i - lag))
        acts += [W(r, i) for i in range(max(0, m - lag), m)]
        actions[r] = acts
    return Schedule.build(name, m, Placement.looped(p), actions)


def zb_v(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-V: two chunks per rank on the V placement, rank r holding stages r and 2p-1-r.

    A microbatch runs down the ranks on chunk 0 and back up on chunk 1, so rank 0
    holds both the first and the last stage and the loss is computed where the
    pipeline started. Rank r, with chunk 0 = stage r and chunk 1 = stage 2p-1-r:

    1. warm-up: ``2(p - r) - 1`` chunk-0 forwards, then r pairs (chunk-1 F, chunk-0 F),
       then p - r triples (chunk-1 F, B, W);
    2. steady: (chunk-0 F, B, W, chunk-1 F, B, W) until every forward has run;
    3. drain: r pairs (chunk-0 B, chunk-1 B), p - r pairs (chunk-0 B, W), then the
       deferred Ws, chunk 1 first.

    It is built for ``max(m, 2p - 1)`` microbatches and the actions of microbatches
    past m are dropped, which keeps it valid for every m >= 1. Clock table,
    2 ranks, 4 microbatches (``3F0``: stage 3, forward of microbatch 0)::

        rank 0: 0F0 0F1 0F2 3F0 3B0 3W0 3F1 3B1 3W1 0F3 0B0 0W0 3F2 3B2 3W2 0B1 0W1 3F3 3B3 3W3 0B2 0W2 0B3 0W3 .
        rank 1: .   1F0 2F0 1F1 2F1 2B0 2W0 1F2 1B0 1W0 2F2 2B1 2W1 1F3 1B1 1W1 2F3 2B2 2W2 1B2 2B3 1B3 1W2 2W3 1W3
    """
    check_sizes("zb-v", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    n = max(m, 2 * p - 1)
    actions: dict[int, list[Action]] = {}
    for r in range(p):
        chunk = _Chunks(r, 2 * p - 1 - r)
        for _ in range(2 * (p - r) - 1):
            chunk.run(0, "F")
        for _ in range(r):
            chunk.run(1, "F")
            chunk.run(0, "F")
        for _ in range(p - r):
            chunk.run(1, "F", "B", "W")
        while chunk.count[1]["F"] < n:
            if chunk.count[0]["F"] < n:
                chunk.run(0, "F")
            chunk.run(0, "B", "W")
            chunk.run(1, "F", "B", "W")
        for _ in range(r):
            chunk.run(0, "B")
            chunk.run(1, "B")
        for _ in range(p - r):
            chunk.run(0, "B", "W")
        for c in (1, 0):
            while chunk.count[c]["W"] < n:
                chunk.run(c, "W")
        actions[r] = [a for a in chunk.actions if a.microbatch < m]
    return Schedule.build("zb-v", m, Placement.vshape(p), actions)


class _Chunks:
    """Emits one rank's actions, numbering each (chunk, kind) stream's microbatches in order."""

    def __init__(self, *stages: int) -> None:
        self.stages = stages
        self.count = [{"F": 0, "B": 0, "W": 0} for _ in stages]
        self.actions: list[Action] = []

    def run(self, chunk: int, *kinds: str) -> None:
        make = {"F": F, "B": B, "W": W}
        for kind in kinds:
            self.actions.append(make[kind](self.stages[chunk], self.count[chunk][kind]))
            self.count[chunk][kind] += 1
