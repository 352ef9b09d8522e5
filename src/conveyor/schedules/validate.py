"""Symbolic execution of a schedule: dependency checks, deadlock detection, timing.

One engine serves both the validator (unit costs) and the simulator (measured or
analytic costs): every rank runs its list in order; an action starts when its
rank is free and the actions it depends on have finished. Works on plain
schedules (cross-rank dependencies are implicit) and on lowered ones (a compute
action waits for its RECV, a RECV for the matching SEND).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .ir import Action, Kind, Schedule, ScheduleError, format_table

__all__ = [
    "TimedAction",
    "Execution",
    "execute",
    "validate",
    "ScheduleStats",
    "check_coverage",
    "activation_events",
    "peak_activations",
    "DeadlockError",
]

Key = tuple[Kind, int, int]  # (kind, stage, microbatch): an event that has happened
_CROSSING = (Kind.SEND_F, Kind.SEND_B, Kind.F, Kind.I)  # events another rank may wait on


class DeadlockError(ScheduleError):
    """No rank can make progress.

    ``waits`` maps each blocked ``(rank, step index)`` to the actions it waits for,
    so callers (e.g. the CSV reader) can point at the cell.
    """

    def __init__(self, message: str, waits: dict[tuple[int, int], list[Action]]) -> None:
        super().__init__(message)
        self.waits = waits


@dataclass(frozen=True)
class TimedAction:
    """An action placed on the clock: ``ready`` is when its inputs were available."""

    rank: int
    action: Action
    start: float
    end: float
    ready: float


@dataclass(frozen=True)
class Execution:
    """Result of executing a schedule: per-rank timelines in start order."""

    timeline: dict[int, list[TimedAction]]

    @property
    def makespan(self) -> float:
        """Time from the first start to the last end."""
        return max((t.end for row in self.timeline.values() for t in row), default=0.0)

    def busy(self, rank: int) -> float:
        """Time ``rank`` spends in compute actions."""
        return sum(t.end - t.start for t in self.timeline[rank] if t.action.kind.is_compute)

    def bubble_fraction(self) -> float:
        """Idle share of all ranks over the whole step: 1 - busy / (ranks * makespan)."""
        span = self.makespan
        if span == 0:
            return 0.0
        total_busy = sum(self.busy(r) for r in self.timeline)
        return 1.0 - total_busy / (len(self.timeline) * span)

    def span(self, rank: int) -> float:
        """Time from ``rank``'s first compute start to its last compute end (0 if it has none)."""
        row = [t for t in self.timeline[rank] if t.action.kind.is_compute]
        if not row:
            return 0.0
        return max(t.end for t in row) - min(t.start for t in row)

    def steady_bubble_fraction(self) -> float:
        """Idle share inside each rank's own span: 1 - busy / sum of per-rank spans.

        Unlike :meth:`bubble_fraction` it does not count the time before a rank's first
        action or after its last one, i.e. the start-up skew that no schedule can avoid
        (rank r cannot start before r forwards have reached it). It is 0 exactly when no
        rank ever waits once it has started: the steps then tile back to back.
        """
        total_span = sum(self.span(r) for r in self.timeline)
        if total_span == 0:
            return 0.0
        return 1.0 - sum(self.busy(r) for r in self.timeline) / total_span

    def clock_table(self, stages: bool | None = None) -> str:
        """Compute actions on an integer clock, one row per rank ('.' = idle); unit costs only.

        A cell reads ``F3`` (kind and microbatch), or ``2F3`` with the stage when
        ``stages`` is true. By default the stage is shown only when some rank runs
        more than one stage (interleaved or V placement), where ``F3`` would be ambiguous.
        """
        if stages is None:
            stages = any(
                len({t.action.stage for t in row if t.action.kind.is_compute}) > 1
                for row in self.timeline.values()
            )
        width = int(round(self.makespan))
        rows = []
        for rank in sorted(self.timeline):
            cells = ["."] * width
            for t in self.timeline[rank]:
                if t.action.kind.is_compute:
                    a = t.action
                    label = "+".join(  # an overlapped pair reads 0F3+3B1 over both its ticks
                        str(x) if stages else f"{x.kind.value}{x.microbatch}" for x in a.parts
                    )
                    for c in range(int(round(t.start)), int(round(t.end))):
                        cells[c] = label
            cell_w = max(len(c) for c in cells) if cells else 1
            rows.append(f"rank {rank}: " + " ".join(c.ljust(cell_w) for c in cells).rstrip())
        return "\n".join(rows)


def _deps(schedule: Schedule, rank: int, a: Action) -> list[Key]:
    """Events that must have happened before ``a`` may start on ``rank``.

    The input-grad of (stage, microbatch) is the event ``(I, stage, mb)``, recorded by
    its B or its I, whichever the schedule runs.
    """
    if a.kind is Kind.OVERLAP_F_B:
        own = {_key(p) for p in a.sub}
        return [d for p in a.sub for d in _deps(schedule, rank, p) if d not in own]
    place = schedule.placement
    last = schedule.num_stages - 1
    s, m = a.stage, a.microbatch
    lowered = schedule.lowered
    if a.kind is Kind.F:
        if s == 0:
            return []
        if lowered and place.rank_of(s - 1) != rank:
            return [(Kind.RECV_F, s, m)]
        return [(Kind.F, s - 1, m)]
    if a.kind.is_backward:
        deps: list[Key] = [(Kind.F, s, m)]
        if s < last:
            if lowered and place.rank_of(s + 1) != rank:
                deps.append((Kind.RECV_B, s, m))
            else:
                deps.append((Kind.I, s + 1, m))
        return deps
    if a.kind is Kind.W:
        return [(Kind.I, s, m)]
    if a.kind is Kind.SEND_F:
        return [(Kind.F, s, m)]
    if a.kind is Kind.SEND_B:
        return [(Kind.I, s, m)]
    if a.kind is Kind.RECV_F:
        return [(Kind.SEND_F, s - 1, m)]
    return [(Kind.SEND_B, s + 1, m)]  # RECV_B


def _key(a: Action) -> Key:
    return (a.kind, a.stage, a.microbatch)


def _events(a: Action) -> list[Key]:
    """Events an action produces once done (a B also makes its input-grad ready)."""
    out = []
    for p in a.parts:
        out.append(_key(p))
        if p.kind is Kind.B:
            out.append((Kind.I, p.stage, p.microbatch))
    return out


def check_coverage(schedule: Schedule) -> None:
    """Each (stage, microbatch) runs F, then either one B or an I and a W, once, on its rank.

    A forward-only schedule (no backward anywhere) needs only the F actions.
    """
    place = schedule.placement
    counts: Counter[tuple[Kind, int, int]] = Counter()
    for rank, acts in schedule.actions.items():
        for i, action in enumerate(acts):
            for a in action.parts:
                _check_action(schedule, rank, i, a)
                key = _key(a)
                counts[key] += 1
                if counts[key] > 1:
                    raise ScheduleError(_at(schedule, rank, i, f"{a} appears more than once"))
    backward = not schedule.forward_only
    for s in range(schedule.num_stages):
        for m in range(schedule.num_microbatches):
            b, i, w = (counts[(k, s, m)] for k in (Kind.B, Kind.I, Kind.W))
            missing = []
            if counts[(Kind.F, s, m)] == 0:
                missing.append(Action(s, Kind.F, m))
            if b and (i or w):
                raise ScheduleError(
                    f"schedule {schedule.name!r} runs both {Action(s, Kind.B, m)} and a split "
                    f"backward ({Action(s, Kind.I, m)}/{Action(s, Kind.W, m)}); use one B, or "
                    "one I and one W"
                )
            if i != w:
                lone, other = (Kind.I, Kind.W) if i else (Kind.W, Kind.I)
                raise ScheduleError(
                    f"schedule {schedule.name!r} runs {Action(s, lone, m)} without "
                    f"{Action(s, other, m)}; an I needs its W and a W its I"
                )
            if backward and not (b or i):
                missing.append(Action(s, Kind.B, m))
            for a in missing:
                raise ScheduleError(
                    f"schedule {schedule.name!r} never runs {a} (rank {place.rank_of(s)})"
                )


def _check_action(schedule: Schedule, rank: int, i: int, a: Action) -> None:
    if not 0 <= a.stage < schedule.num_stages:
        raise ScheduleError(_at(schedule, rank, i, f"stage {a.stage} does not exist"))
    if not 0 <= a.microbatch < schedule.num_microbatches:
        raise ScheduleError(
            _at(schedule, rank, i, f"microbatch {a.microbatch} is out of range "
                f"0..{schedule.num_microbatches - 1}")
        )
    if schedule.placement.rank_of(a.stage) != rank:
        raise ScheduleError(
            _at(schedule, rank, i, f"stage {a.stage} is placed on rank "
                f"{schedule.placement.rank_of(a.stage)}, not on rank {rank}")
        )


def _at(schedule: Schedule, rank: int, index: int, reason: str) -> str:
    grid = format_table(schedule.actions, marks=[(rank, index)])
    return f"schedule {schedule.name!r}, rank {rank}, step {index}: {reason}\n{grid}"


def execute(
    schedule: Schedule,
    duration: Callable[[int, Action], float] = lambda rank, a: (
        float(len(a.parts)) if a.kind.is_compute else 0.0  # an overlapped pair: two ticks
    ),
    latency: Callable[[Action], float] = lambda a: 0.0,
) -> Execution:
    """Run the schedule on a clock; raise ScheduleError naming the stuck actions on deadlock.

    ``duration(rank, action)`` is how long an action occupies its rank; ``latency(action)``
    is added between a SEND (or, unlowered, a producing compute on another rank) and the
    action waiting for it.
    """
    done: dict[Key, tuple[float, int]] = {}  # event -> (time it is available, producer rank)
    pos = {r: 0 for r in schedule.actions}
    free = {r: 0.0 for r in schedule.actions}
    timeline: dict[int, list[TimedAction]] = {r: [] for r in schedule.actions}
    remaining = sum(len(a) for a in schedule.actions.values())
    while remaining:
        progressed = False
        for rank, acts in schedule.actions.items():
            while pos[rank] < len(acts):
                a = acts[pos[rank]]
                deps = _deps(schedule, rank, a)
                if any(d not in done for d in deps):
                    break
                ready = 0.0
                for d in deps:
                    t, producer = done[d]
                    crosses = producer != rank and d[0] in _CROSSING
                    ready = max(ready, t + (latency(a) if crosses else 0.0))
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    # A receive spans the wait, from the moment the rank asks until the data
                    # is there: the same shape as a measured timeline's receive.
                    start, end = free[rank], max(free[rank], ready)
                else:
                    start = max(free[rank], ready)
                    end = start + duration(rank, a)
                free[rank] = end
                for event in _events(a):
                    done[event] = (end, rank)
                timeline[rank].append(TimedAction(rank, a, start, end, ready))
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise _deadlock(schedule, pos, done)
    return Execution(timeline)


def _deadlock(schedule: Schedule, pos: dict[int, int], done: dict[Key, object]) -> DeadlockError:
    lines = [f"schedule {schedule.name!r} deadlocks:"]
    waits: dict[tuple[int, int], list[Action]] = {}
    for rank, acts in schedule.actions.items():
        if pos[rank] >= len(acts):
            continue
        a = acts[pos[rank]]
        missing = [_producer(schedule, d) for d in _deps(schedule, rank, a) if d not in done]
        lines.append(
            f"  rank {rank} step {pos[rank]}: {a} waits for "
            + ", ".join(f"{x} (rank {schedule.placement.rank_of(x.stage)})" for x in missing)
        )
        waits[(rank, pos[rank])] = missing
    lines.append(format_table(schedule.actions, marks=list(waits)))
    return DeadlockError("\n".join(lines), waits)


def _producer(schedule: Schedule, event: Key) -> Action:
    """The action that makes ``event`` happen: the input-grad event ``I`` is a B's when full."""
    kind, s, m = event
    if kind is Kind.I and Action(s, Kind.B, m) in schedule.parts(schedule.placement.rank_of(s)):
        return Action(s, Kind.B, m)
    return Action(s, kind, m)


@dataclass(frozen=True)
class ScheduleStats:
    """What the validator reports about a schedule under unit costs."""

    bubble_fraction: float
    """Idle share of all ranks over the whole step: 1 - busy / (ranks * makespan)."""
    makespan: float
    peak_activations: dict[int, int]
    """Per rank: most microbatch-stages held at once (F done, B or W not yet)."""
    steady_bubble_fraction: float = float("nan")
    """Idle share inside each rank's own first-to-last-action span (see
    :meth:`Execution.steady_bubble_fraction`); ``validate`` always fills it, nan otherwise."""


def activation_events(schedule: Schedule, rank: int) -> list[tuple[Action, int]]:
    """``rank``'s single actions that change what it holds, in order: (action, +1 or -1).

    The one definition of held activations, shared by :func:`peak_activations` and the
    simulator's memory walk: an F starts holding its stage-microbatch (+1); its B, or
    its W when the backward is split, releases it (-1). An I releases nothing, as the
    W still needs the layer inputs. An overlapped pair counts its F before its
    backward: both run at once, so the new activations exist before the old ones go.
    A forward-only schedule keeps nothing for a backward, so it has no events.
    """
    if schedule.forward_only:
        return []
    delta = {Kind.F: 1, Kind.B: -1, Kind.W: -1}
    return [(a, delta[a.kind]) for a in schedule.parts(rank) if a.kind in delta]


def peak_activations(
    schedule: Schedule, size: Callable[[int], int] | None = None
) -> dict[int, int]:
    """Per rank, the most activations held at once: stage-microbatches, or ``size(stage)`` units.

    The one definition Conveyor uses everywhere (validator, simulator, runtime meter):
    a forward's activations are held from its F until its backward is complete, i.e.
    until its B, or until its W when split (an I frees part of them, but the W still
    needs the layer inputs); see :func:`activation_events`. ``size`` weighs a stage's
    microbatch, e.g. in bytes; by default each counts 1. A forward-only schedule holds
    nothing for a backward, so its peaks are all 0.
    """
    peaks = {}
    for rank in schedule.actions:
        live = peak = 0
        for a, sign in activation_events(schedule, rank):
            live += sign * (size(a.stage) if size is not None else 1)
            peak = max(peak, live)
        peaks[rank] = peak
    return peaks


def validate(
    schedule: Schedule,
    f_cost: float = 1.0,
    b_cost: float = 1.0,
    w_cost: float = 1.0,
) -> ScheduleStats:
    """Check a schedule can run; return its bubble and peak activations under given unit costs."""
    check_coverage(schedule)
    # unit costs by default: every compute action (B, I or W alike) takes one tick
    cost = {Kind.F: f_cost, Kind.B: b_cost, Kind.I: b_cost, Kind.W: w_cost}
    run = execute(schedule, lambda rank, a: sum(cost.get(p.kind, 0.0) for p in a.parts))
    return ScheduleStats(
        run.bubble_fraction(),
        run.makespan,
        peak_activations(schedule),
        run.steady_bubble_fraction(),
    )
