"""Which compute actions can run at the same time: the schedule's happens-before order.

Action A *happens before* B when B cannot start until A has ended in any execution,
whatever each action costs: A comes earlier on B's rank, or B needs (transitively)
something A produced. Two compute actions on different ranks that are ordered
neither way may overlap on some machine; two that are ordered never do.

This is what the runtime needs to lend idle cores safely (``core_shares``): while a
rank runs an action that no other rank can run alongside (rank 0's first forward,
the last backwards), the other ranks' cores are idle by construction, on every
machine and at every speed, so that action may use them. Sends do not order
anything here: they are posted without waiting, so only a compute action's own
inputs hold it back.
"""

from __future__ import annotations

from .ir import Action, Schedule, ScheduleError
from .validate import _deps, _events

__all__ = ["concurrent_ranks", "core_shares"]

Node = tuple[int, int]  # (rank, index among the rank's compute actions)


def concurrent_ranks(schedule: Schedule) -> dict[int, dict[Action, int]]:
    """For each rank and compute action, how many other ranks may compute while it runs."""
    if schedule.lowered:
        raise ScheduleError(
            f"schedule {schedule.name!r}: concurrent_ranks reads the compute actions' own order; "
            "pass the schedule before lower()"
        )
    nodes = [(r, i) for r in sorted(schedule.actions) for i in range(len(schedule.actions[r]))]
    bit = {n: 1 << k for k, n in enumerate(nodes)}
    producer: dict[tuple, Node] = {}
    for r, acts in schedule.actions.items():
        for i, a in enumerate(acts):
            for event in _events(a):
                producer[event] = (r, i)
    preds: dict[Node, list[Node]] = {}
    for r, acts in schedule.actions.items():
        for i, a in enumerate(acts):
            before = [(r, i - 1)] if i else []
            preds[(r, i)] = before + [producer[d] for d in _deps(schedule, r, a) if d in producer]
    order = _topological(nodes, preds, schedule.name)
    ancestors: dict[Node, int] = {}
    for n in order:
        mask = 0
        for p in preds[n]:
            mask |= ancestors[p] | bit[p]
        ancestors[n] = mask
    descendants = {n: 0 for n in nodes}
    for n in reversed(order):
        for p in preds[n]:
            descendants[p] |= descendants[n] | bit[n]
    rank_mask = {r: 0 for r in schedule.actions}
    for n in nodes:
        rank_mask[n[0]] |= bit[n]
    out: dict[int, dict[Action, int]] = {}
    for r, acts in schedule.actions.items():
        row: dict[Action, int] = {}
        for i, a in enumerate(acts):
            n = (r, i)
            unordered = ~(ancestors[n] | descendants[n])
            row[a] = sum(1 for q, mask in rank_mask.items() if q != r and mask & unordered)
        out[r] = row
    return out


def core_shares(schedule: Schedule) -> dict[int, dict[Action, int]]:
    """For each rank, the compute actions that may use more than their own rank's cores, and how many ranks' worth.

    An action that at most ``k`` other ranks can run alongside gets
    ``num_ranks // (k + 1)`` ranks' cores. At any moment the ``n`` ranks computing
    each see at least ``n - 1`` others, so together they never take more than
    ``num_ranks`` ranks' cores: lending never oversubscribes the machine.
    """
    ranks = schedule.num_ranks
    return {
        r: {a: share for a, k in row.items() if (share := ranks // (k + 1)) > 1}
        for r, row in concurrent_ranks(schedule).items()
    }


def _topological(nodes: list[Node], preds: dict[Node, list[Node]], name: str) -> list[Node]:
    """``nodes`` with every node after its predecessors; a cycle is a schedule that deadlocks."""
    waiting = {n: len(preds[n]) for n in nodes}
    succs: dict[Node, list[Node]] = {n: [] for n in nodes}
    for n in nodes:
        for p in preds[n]:
            succs[p].append(n)
    ready = [n for n in nodes if waiting[n] == 0]
    order: list[Node] = []
    while ready:
        n = ready.pop()
        order.append(n)
        for s in succs[n]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    if len(order) != len(nodes):
        raise ScheduleError(f"schedule {name!r} deadlocks: its actions wait on each other in a cycle")
    return order
