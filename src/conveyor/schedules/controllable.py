"""V-Half and V-Min (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024).

A schedule is one *building block* (where the passes of a single microbatch fall on
each rank) repeated every 6 slots, the work of one microbatch on one rank: chunk-0 F,
chunk-1 F, chunk-1 I, chunk-0 I and their two Ws. The block's *lifespan* on a rank
(F to W of each chunk) over the period 6 is how many chunk-microbatches that rank
holds at once, so choosing the block chooses the memory. Both blocks are on the V
placement (rank r holds stage r, chunk 0, and stage 2p-1-r, chunk 1), whose two
chunks on a rank have lifespans that add up to the same total on every rank:

* V-Half: chunk-0 F at slot ``2r``, chunk-1 F at ``3p-2-r``, chunk-1 I at
  ``3p-1+g+2r``, chunk-0 I at ``6p-2+g-r`` (g = 3 for even p, else 0): lifespans sum
  to about 6p, so a rank holds about p chunks, half of 1F1B's 2p (p full stages);
* V-Min: ``r``, ``2p-1-r``, ``2p+g+r``, ``4p-1+g-r`` (g = 2 when 3 divides p, else
  0): lifespans sum to about 4p, about 2p/3 chunks, a third of 1F1B's.

The gap g keeps two microbatches' passes off the same slot. Built as the paper
builds them, in three passes of our own:

1. repeat the block m times and put each W in the first free slot after its I
   (chunk 1's first), the leftovers at the end;
2. squeeze: visit the passes in slot order and move each to the earliest free slot
   after its inputs where the rank's held activations stay within the block's peak;
3. drain: from each rank's last forward on, run an I as soon as it is ready and the
   oldest pending W only when no I is (after the last F nothing can raise the peak).

With F = I = W = 1 (so a rank has 6m units of work) the validator measures, for p
ranks and m microbatches (p = 1..12, m = 1..40):

======  ====================================  ===========  ==============================
name    makespan                              for          peak activations, chunks
======  ====================================  ===========  ==============================
v-half  6m + max(p - 1, 6 * ceil(p/2) - 7)    m >= p       min(2m, 2 * floor(p/2) + 2)
v-min   6m + max(p - 1, 4p - 5 - 2 * [3|p])   m >= 2       min(2m, 2 * floor((p+4)/3))
zb-v    6m + p - 1 (for comparison)           2m >= 3p-1   2p, as 1F1B
======  ====================================  ===========  ==============================

(``[3|p]`` is 1 when 3 divides p), so ``bubble_fraction = (makespan - 6m) / makespan``.
The peak is the most any rank holds (some ranks hold fewer); in full-stage units it
is the paper's ``(p+2)//2`` and ``(p+4)//3`` against 1F1B's p, that is about a half
and a third. The price is bubble: about 3p (V-Half) and 4p (V-Min) idle slots where
ZB-V has p - 1 and 1F1B, on the same 6 units per microbatch, 6(p - 1).
"""

from __future__ import annotations

from collections import deque

from .ir import Action, F, I, Kind, Placement, Schedule, W, check_sizes

__all__ = ["v_half", "v_min"]

Block = list[tuple[int, int, int, int]]
"""Per rank: the slots of (chunk-0 F, chunk-1 F, chunk-1 I, chunk-0 I) of microbatch 0."""

_PERIOD = 6  # slots per microbatch and rank: two Fs, two Is, two Ws


def v_half(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-Half: about half of 1F1B's activation memory, for a bubble of about 3p slots.

    Clock table, 4 ranks, 4 microbatches (peak 6 chunks a rank; 1F1B holds 8)::

        rank 0: 0F0 0F1 0F2 0F3 .   .   .   7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 0I0 0W0 .   7F3 7I3 0I1 7W3 0I2 0W1 0W2 .   0I3 0W3
        rank 1: .   1F0 1F1 1F2 1F3 .   6F0 .   6F1 6I0 6W0 6F2 6I1 6W1 .   1I0 1W0 6I2 6F3 6W2 1I1 6I3 1I2 1W1 6W3 1W2 1I3 1W3 .
        rank 2: .   .   2F0 2F1 2F2 5F0 .   5F1 .   5F2 5I0 5W0 2F3 5I1 2I0 5W1 2W0 5F3 5I2 2I1 5W2 2I2 5I3 2W1 2W2 2I3 5W3 2W3 .
        rank 3: .   .   .   3F0 4F0 3F1 4F1 3F2 4F2 .   .   4I0 4W0 3I0 3W0 3F3 4F3 4I1 3I1 4I2 3I2 4W1 3W1 4I3 3I3 4W2 3W2 4W3 3W3
    """
    check_sizes("v-half", num_ranks, num_microbatches)
    p = num_ranks
    g = 3 if p % 2 == 0 else 0
    block = [(2 * r, 3 * p - 2 - r, 3 * p - 1 + g + 2 * r, 6 * p - 2 + g - r) for r in range(p)]
    return _from_block("v-half", p, num_microbatches, block)


def v_min(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-Min: about a third of 1F1B's activation memory, for a bubble of about 4p slots.

    Clock table, 4 ranks, 4 microbatches (peak 4 chunks a rank; 1F1B holds 8)::

        rank 0: 0F0 0F1 0F2 .   .   .   .   7F0 7I0 7W0 7F1 7I1 7W1 0F3 .   0I0 0W0 .   .   7F2 7I2 0I1 7W2 0W1 .   7F3 7I3 0I2 7W3 0W2 .   .   .   0I3 0W3
        rank 1: .   1F0 1F1 .   .   .   6F0 .   6F1 6I0 6W0 1F2 6I1 6W1 1I0 1W0 1F3 .   6F2 .   1I1 6I2 6W2 1W1 6F3 .   1I2 6I3 1W2 6W3 .   .   1I3 1W3 .
        rank 2: .   .   2F0 2F1 .   5F0 .   5F1 .   .   5I0 5W0 2F2 2I0 2W0 5I1 5W1 5F2 2F3 2I1 2W1 .   5I2 5F3 5W2 2I2 2W2 .   5I3 5W3 .   2I3 2W3 .   .
        rank 3: .   .   .   3F0 4F0 3F1 4F1 .   .   .   .   4I0 3I0 4W0 3W0 3F2 4F2 4I1 3I1 4W1 3W1 3F3 4F3 4I2 3I2 4W2 3W2 .   .   4I3 3I3 4W3 3W3 .   .
    """
    check_sizes("v-min", num_ranks, num_microbatches)
    p = num_ranks
    g = 2 if p % 3 == 0 else 0
    block = [(r, 2 * p - 1 - r, 2 * p + g + r, 4 * p - 1 + g - r) for r in range(p)]
    return _from_block("v-min", p, num_microbatches, block)


def _from_block(name: str, p: int, m: int, block: Block) -> Schedule:
    lines = [_repeat(p, r, m, slots) for r, slots in enumerate(block)]
    _squeeze(lines, 2 * p)
    return Schedule.build(name, m, Placement.vshape(p), _drain(lines, p))


def _repeat(p: int, r: int, m: int, slots: tuple[int, int, int, int]) -> dict[int, Action]:
    """One rank's timeline, slot -> action: the block every 6 slots, Ws in the free slots."""
    down, up = r, 2 * p - 1 - r
    line: dict[int, Action] = {}
    for k in range(m):
        for t, a in zip(slots, (F(down, k), F(up, k), I(up, k), I(down, k)), strict=True):
            assert t + _PERIOD * k not in line, f"block collides on rank {r} at slot {t}"
            line[t + _PERIOD * k] = a
    end = max(line)
    weights: tuple[deque[Action], deque[Action]] = (deque(), deque())  # chunk 1's, chunk 0's
    t = 0
    while t <= end or weights[0] or weights[1]:
        a = line.get(t)
        if a is not None:
            if a.kind is Kind.I:
                weights[a.stage == down].append(W(a.stage, a.microbatch))
        elif weights[0] or weights[1]:
            line[t] = (weights[0] or weights[1]).popleft()
        t += 1
    return line


def _squeeze(lines: list[dict[int, Action]], num_stages: int) -> None:
    """Move every action, in slot order, to the earliest free slot its inputs allow.

    An F moves only where the rank's held activations stay within the peak the
    repeated block already has; moving an I changes nothing held, moving a W frees
    earlier. Later actions have not moved yet, so inputs are always in place.
    """
    slot_of = {(a.kind, a.stage, a.microbatch): t for line in lines for t, a in line.items()}
    held = [_held(line) for line in lines]
    cap = [max(h, default=0) for h in held]
    for t, r in sorted((t, r) for r, line in enumerate(lines) for t in line):
        line, a = lines[r], lines[r][t]
        earliest = max((slot_of[d] + 1 for d in _inputs(a, num_stages)), default=0)
        for u in range(earliest, t):
            if u in line:
                continue
            if a.kind is Kind.F:
                if max(held[r][u:t]) >= cap[r]:
                    continue
                for v in range(u, t):
                    held[r][v] += 1
            elif a.kind is Kind.W:
                for v in range(u, t):
                    held[r][v] -= 1
            del line[t]
            line[u] = a
            slot_of[(a.kind, a.stage, a.microbatch)] = u
            break


def _held(line: dict[int, Action]) -> list[int]:
    """Activations held at the end of every slot of one rank's timeline."""
    out, live = [], 0
    for t in range(max(line) + 1):
        a = line.get(t)
        if a is not None and a.kind is Kind.F:
            live += 1
        elif a is not None and a.kind is Kind.W:
            live -= 1
        out.append(live)
    return out


def _inputs(a: Action, num_stages: int) -> list[tuple[Kind, int, int]]:
    """What ``a`` waits for, including the previous microbatch of its own stream."""
    s, k = a.stage, a.microbatch
    deps = [(a.kind, s, k - 1)] if k > 0 else []
    if a.kind is Kind.F and s > 0:
        deps.append((Kind.F, s - 1, k))
    elif a.kind is Kind.I:
        deps.append((Kind.F, s, k))
        if s < num_stages - 1:
            deps.append((Kind.I, s + 1, k))
    elif a.kind is Kind.W:
        deps.append((Kind.I, s, k))
    return deps


def _drain(lines: list[dict[int, Action]], p: int) -> dict[int, list[Action]]:
    """Run the timelines on a unit clock; after its last F a rank takes Is before Ws.

    Up to its last F a rank keeps its squeezed order; after it, it starts whichever
    I is ready (in squeezed order) and otherwise its oldest pending W. Returns each
    rank's actions in the order they started.
    """
    orders = [[line[t] for t in sorted(line)] for line in lines]
    prefix, tails = [], []
    for order in orders:
        last_f = max(i for i, a in enumerate(order) if a.kind is Kind.F)
        prefix.append(deque(order[: last_f + 1]))
        tails.append([a for a in order[last_f + 1 :] if a.kind is Kind.I])
    pending: list[list[Action]] = [[] for _ in range(p)]
    done: set[tuple[Kind, int, int]] = set()
    out: dict[int, list[Action]] = {r: [] for r in range(p)}
    while any(prefix[r] or tails[r] or pending[r] for r in range(p)):
        # one tick: every rank starts what is ready now; it is done by the next tick
        started = [(r, _next(prefix[r], tails[r], pending[r], done, 2 * p)) for r in range(p)]
        started = [(r, a) for r, a in started if a is not None]
        assert started, "the squeezed timelines cannot stall"
        for r, a in started:
            out[r].append(a)
            done.add((a.kind, a.stage, a.microbatch))
            if a.kind is Kind.I:
                pending[r].append(W(a.stage, a.microbatch))
            elif a.kind is Kind.W:
                pending[r].remove(a)
    return out


def _next(
    prefix: deque[Action],
    tail: list[Action],
    pending: list[Action],
    done: set[tuple[Kind, int, int]],
    num_stages: int,
) -> Action | None:
    """The action one rank starts this tick, or None if it must wait."""

    def ready(a: Action) -> bool:
        return all(d in done for d in _inputs(a, num_stages))

    if prefix:
        return prefix.popleft() if ready(prefix[0]) else None
    heads: dict[int, Action] = {}
    for a in tail:
        heads.setdefault(a.stage, a)
    for a in tail:
        if heads[a.stage] is a and ready(a):
            tail.remove(a)
            return a
    return pending[0] if pending else None
