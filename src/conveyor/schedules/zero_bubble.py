"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).

The backward is split in two: I computes the gradient of the stage's input (the
next rank upstream waits for it) and W the gradient of its weights (nobody waits
for it). W can therefore be deferred into the time a rank would otherwise idle.

What "zero bubble" means here. The validator's ``bubble_fraction`` is
``1 - busy / (ranks * makespan)`` over one step. Rank r cannot start before r
forwards have reached it, so with F = I = W = 1 no schedule of single-stage ranks
beats a makespan of ``max(3m + p - 1, 2m + 2p - 1)``: rank p - 1 starts at p - 1
and has 3m units of work, and the microbatch whose I is last on rank p - 1 still
has p - 1 Is (one per rank upstream) and one W to go after it. That start-up skew is not idle time that a
schedule can remove; the next step's warm-up overlaps it once the optimizer step
does not synchronise the ranks (the paper's post-validation). So we report two
figures (both from :func:`conveyor.schedules.validate`):

* ``bubble_fraction``: the whole-step metric above;
* ``steady_bubble_fraction``: idle time inside each rank's own span, from its first
  action to its last. A schedule is *zero bubble* when this is exactly 0.

With F = I = W = 1 the validator measures, for p ranks and m microbatches:

======  =====================================  =============================  ==============
name    makespan (all m >= 1)                   bubble_fraction                steady = 0 iff
======  =====================================  =============================  ==============
zb-h1   max(3m + p - 1, 2m + 2p - 1)            (p-1)/(3m+p-1) for m >= p      p == 1
zb-h2   max(3m + p - 1, 2m + 2p - 1)            (p-1)/(3m+p-1) for m >= p      m >= 2p - 1
zb-v    max(6m + p - 1, 4m + 4p - 2)            (p-1)/(6m+p-1) for 2m >= 3p-1  m >= 2p - 1
======  =====================================  =============================  ==============

ZB-H1 and ZB-H2 reach the lower bound for every m; ZB-V reaches its own (rank p - 1
starts at p - 1 and has 6m units) once 2m >= 3p - 1.

Peak held activations per rank r, in stage-microbatches, as
:func:`~conveyor.schedules.validate.peak_activations` counts them: held from the F
until the W (an I frees nothing: the W still needs its layers' inputs).

* ZB-H1: ``min(p, m)`` on every rank, where 1F1B holds ``min(p - r, m)``. Rank r
  runs ``w = min(p - 1 - r, m)`` warm-up forwards, then in step i the forward of
  microbatch w + i, the I of i, and the W of i - r once i >= r. After step i's
  forward it holds ``w + i + 1 - max(0, i - r)``, which grows until i = r and then
  stays at ``w + r + 1 = p`` (m if fewer forwards exist): each W runs r steps late, so r more microbatches are
  held than in 1F1B. That is the memory ZB-H1 pays for filling the drain; rank 0,
  which defers nothing, holds what 1F1B's rank 0 does.
* ZB-H2: the same walk with ``w_r = p - 1 - r + e_r`` warm-up forwards and Ws
  ``lag_r = r + min(r, x)`` steps late (``e_r``, ``x`` as in :func:`zb_h2`) peaks at
  ``min(m, w_r + lag_r + 1) = min(m, p + min(p - 1 - r, x) + min(r, x))``, i.e.
  ``2p - 1`` on every rank once m >= 2p - 1: about twice 1F1B's rank-0 peak.
* ZB-V: ``min(2p - 1 - r, m) + min(r + 1, m) = min(2p, 2m, m + 1 + r)`` chunks:
  nothing is released before the first chunk-1 W, by which time rank r has run
  ``2p - 1 - r`` chunk-0 and ``r + 1`` chunk-1 forwards (at most m of each); from
  then on every F is followed by a W before the next F. Outside the drain, which
  runs no F, each I is followed at once by its W, so releasing at the W instead of
  the I changes nothing here. Chunks are half-size stages, so 2p chunks are p
  stages: 1F1B's rank-0 peak, on every rank once m >= 2p - 1.
"""

from __future__ import annotations

from .ir import Action, F, I, Placement, Schedule, W, check_sizes

__all__ = ["zb_h1", "zb_h2", "zb_v"]


def zb_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B's order of F and I, each rank r running every W r steps late.

    Same warm-up as 1F1B; the deferred Ws fill the drain, cutting 1F1B's bubble to a
    third, and hold each microbatch r steps longer, so every rank peaks at
    ``min(p, m)`` held microbatches. Clock table, 3 ranks, 4 microbatches::

        rank 0: F0 F1 F2 .  .  I0 W0 F3 I1 W1 I2 W2 I3 W3
        rank 1: .  F0 F1 .  I0 F2 I1 W0 F3 I2 W1 I3 W2 W3
        rank 2: .  .  F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3
    """
    check_sizes("zb-h1", num_ranks, num_microbatches)
    return _split_1f1b("zb-h1", num_ranks, num_microbatches, extra=0)


def zb_h2(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H2: ZB-H1 with up to p - 1 extra warm-up forwards, so no rank waits once started.

    Rank r runs ``e_r = min(p - 1 - r, x)`` more warm-up forwards and defers its Ws by
    ``min(r, x)`` more steps, where ``x = min(p - 1, max(0, m - p))``; for m <= p it is
    ZB-H1. From m >= 2p - 1 every rank is busy from its first action to its last (the
    paper's parallelogram). Clock table, 3 ranks, 5 microbatches::

        rank 0: F0 F1 F2 F3 F4 I0 W0 I1 W1 I2 W2 I3 W3 I4 W4 .  .
        rank 1: .  F0 F1 F2 I0 F3 I1 F4 I2 W0 I3 W1 I4 W2 W3 W4 .
        rank 2: .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 W1 W2 W3 W4
    """
    check_sizes("zb-h2", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    return _split_1f1b("zb-h2", p, m, extra=min(p - 1, max(0, m - p)))


def _split_1f1b(name: str, p: int, m: int, extra: int) -> Schedule:
    actions: dict[int, list[Action]] = {}
    for r in range(p):
        warmup = min(p - 1 - r + min(p - 1 - r, extra), m)
        lag = r + min(r, extra)  # W of microbatch i runs after I of microbatch i + lag
        acts = [F(r, i) for i in range(warmup)]
        for i in range(m):
            if warmup + i < m:
                acts.append(F(r, warmup + i))
            acts.append(I(r, i))
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
       then p - r triples (chunk-1 F, I, W);
    2. steady: (chunk-0 F, I, W, chunk-1 F, I, W) until every forward has run;
    3. drain: r pairs (chunk-0 I, chunk-1 I), p - r pairs (chunk-0 I, W), then the
       deferred Ws, chunk 1 first.

    It is built for ``max(m, 2p - 1)`` microbatches and the actions of microbatches
    past m are dropped, which keeps it valid for every m >= 1. Clock table,
    2 ranks, 4 microbatches (``3F0``: stage 3, forward of microbatch 0)::

        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3 .
        rank 1: .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3
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
            chunk.run(1, "F", "I", "W")
        while chunk.count[1]["F"] < n:
            if chunk.count[0]["F"] < n:
                chunk.run(0, "F")
            chunk.run(0, "I", "W")
            chunk.run(1, "F", "I", "W")
        for _ in range(r):
            chunk.run(0, "I")
            chunk.run(1, "I")
        for _ in range(p - r):
            chunk.run(0, "I", "W")
        for c in (1, 0):
            while chunk.count[c]["W"] < n:
                chunk.run(c, "W")
        actions[r] = [a for a in chunk.actions if a.microbatch < m]
    return Schedule.build("zb-v", m, Placement.vshape(p), actions)


class _Chunks:
    """Emits one rank's actions, numbering each (chunk, kind) stream's microbatches in order."""

    def __init__(self, *stages: int) -> None:
        self.stages = stages
        self.count = [{"F": 0, "I": 0, "W": 0} for _ in stages]
        self.actions: list[Action] = []

    def run(self, chunk: int, *kinds: str) -> None:
        make = {"F": F, "I": I, "W": W}
        for kind in kinds:
            self.actions.append(make[kind](self.stages[chunk], self.count[chunk][kind]))
            self.count[chunk][kind] += 1
