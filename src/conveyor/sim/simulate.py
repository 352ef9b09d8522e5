"""Simulate one training step of a schedule under a cost model.

The clock is the validator's own engine, :func:`conveyor.schedules.validate.execute`,
run on the lowered schedule, so the simulator and the validator cannot disagree
about dependencies. The step is modelled the way the runtime's executor runs it:

- F, I and W occupy their rank for ``cost.f/b/w[stage]`` seconds; a B (a full
  backward) for ``cost.full_b[stage]``, or ``b + w`` when that was not measured;
- an overlapped F/B pair runs as the default executor runs it: its forward as soon
  as the forward's input is there, then its backward, waiting for the backward's
  input only then; it is busy for the sum of its parts (no overlap speed-up) and
  shows as one action;
- busy time the runtime adds to compute: each message costs its receiver's
  consuming action and its sender's next compute action ``cost.message_compute_s``
  (communication threads sharing the core), and each rank's first compute action of
  the step costs ``cost.step_start_s`` more;
- the executor's work between compute actions counts as idle, as the runtime's
  timeline shows it: a SEND keeps its rank ``cost.send_overhead_s`` (posted right
  after the producing compute) and its message reaches the RECV
  ``cost.transfer_time()`` after the post; before each compute action the rank
  spends ``cost.action_overhead_s`` plus ``cost.recv_overhead_s`` for each receive
  the runtime posts there (those up to the next compute action, posted ahead),
  before it waits for the action's input;
- a RECV spans the wait, from the moment the rank asks for the data until it is
  there, and the compute starts when it ends (the runtime waits only in the
  consumer). Messages do not contend for the link.

Memory per rank = parameters + gradients + optimizer state of its stages (all
step long) + the peak of held activations while walking its actions in order, by
the validator's one definition
(:func:`~conveyor.schedules.validate.activation_events`): an F adds its stage's
``activation_bytes``; its B frees them, or its W when the backward is split (the
inputs of every matmul live until the weight-grad). Transient tensors inside one
action are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from conveyor.schedules import Schedule, execute, lower
from conveyor.schedules.concurrency import core_shares
from conveyor.schedules.ir import Action, Kind
from conveyor.schedules.validate import Execution, TimedAction, peak_activations

from .cost import CostError, CostModel

__all__ = ["SimResult", "simulate", "peak_memory"]

_MIB = 2**20


@dataclass(frozen=True)
class SimResult:
    """A simulated step: the timed actions of every rank and what they add up to."""

    schedule: Schedule
    """The lowered schedule that was run."""
    cost: CostModel
    execution: Execution
    peak_activation_bytes: dict[int, int]
    """Per rank: most bytes of activations held at once (F done, B or W not yet)."""
    peak_memory_bytes: dict[int, int]
    """Per rank: parameters, gradients and optimizer state plus peak activations."""
    dp_end: dict[int, float] = field(default_factory=dict)
    """Per rank: when its data-parallel gradient reduction (and ZeRO-1's all-gather)
    ends; empty without data parallelism."""

    @property
    def pipeline_time(self) -> float:
        """Seconds from the first compute to the last, before the dp reduction's tail."""
        return self.execution.makespan

    @property
    def dp_exposed(self) -> float:
        """Seconds the data-parallel reduction adds after the pipeline's last action."""
        return max(0.0, self.step_time - self.cost.step_end_s - self.pipeline_time)

    def tp_seconds(self, rank: int) -> float:
        """Seconds ``rank`` spends in tensor-parallel collectives (inside its compute)."""
        total = 0.0
        for t in self.timeline[rank]:
            for part in t.action.parts:
                if part.kind is Kind.F:
                    total += self.cost.stage_value("tp_f_s", part.stage)
                elif part.kind in (Kind.B, Kind.I):
                    total += self.cost.stage_value("tp_b_s", part.stage)
        return total

    @property
    def comm_share(self) -> float:
        """Share of the step the busiest rank spends in exposed communication: its tp
        collectives plus the dp reduction's tail (pipeline messages are in the bubble)."""
        step = self.step_time
        if not step:
            return 0.0
        return max(self.tp_seconds(r) for r in self.timeline) / step + self.dp_exposed / step

    @property
    def timeline(self) -> dict[int, list[TimedAction]]:
        """Per-rank timed actions (seconds), as the runtime records measured ones."""
        return self.execution.timeline

    @property
    def step_time(self) -> float:
        """Seconds from the first action to the last, or to the end of the dp reduction,
        plus the step's closing reductions (``cost.step_end_s``)."""
        return max(self.execution.makespan, *self.dp_end.values(), 0.0) + self.cost.step_end_s

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks over the step."""
        return self.execution.bubble_fraction()

    def table(self) -> str:
        """Summary for the CLI: one header line, then one row per rank."""
        step = self.step_time
        sched = self.schedule
        lines = [
            f"schedule {sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
            f"{sched.num_microbatches} microbatches; step {step * 1e3:.3f} ms, "
            f"bubble {self.bubble_fraction:.1%}  [{self.cost.source or 'costs'}]",
            *([f"tensor-parallel collectives {max(map(self.tp_seconds, self.timeline)) * 1e3:.3f}"
               f" ms of the busiest rank; data-parallel reduction adds "
               f"{self.dp_exposed * 1e3:.3f} ms after the pipeline; communication "
               f"{self.comm_share:.1%} of the step"] if self.cost.tp_f_s or self.dp_end else []),
            f"{'rank':>4}  {'stages':<8} {'busy ms':>9} {'idle ms':>9} {'idle':>6}  "
            f"{'peak act MiB':>12}  {'peak mem MiB':>12}",
        ]
        for rank in sorted(self.timeline):
            busy = self.execution.busy(rank)
            stages = ",".join(map(str, sched.placement.stages_of(rank)))
            idle = step - busy
            lines.append(
                f"{rank:>4}  {stages:<8} {busy * 1e3:>9.3f} {idle * 1e3:>9.3f} "
                f"{(idle / step if step else 0.0):>6.1%}  "
                f"{self.peak_activation_bytes[rank] / _MIB:>12.2f}  "
                f"{self.peak_memory_bytes[rank] / _MIB:>12.2f}"
            )
        return "\n".join(lines)


def peak_memory(schedule: Schedule, cost: CostModel) -> tuple[dict[int, int], dict[int, int]]:
    """Per rank (peak held activation bytes, peak total bytes) walking its actions."""
    peak_act = peak_activations(schedule, lambda stage: cost.activation_bytes[stage])
    peak_total = {
        rank: peak + sum(cost.static_bytes(s) for s in schedule.placement.stages_of(rank))
        for rank, peak in peak_act.items()
    }
    return peak_act, peak_total


def simulate(schedule: Schedule, cost: CostModel) -> SimResult:
    """Run ``schedule`` (lowered here if it is not yet) on the clock with ``cost``."""
    if cost.num_stages != schedule.num_stages:
        raise CostError(
            f"cost model has {cost.num_stages} stages but schedule {schedule.name!r} has "
            f"{schedule.num_stages}; build the costs with the same partition "
            "(pp * virtual_stages stages)"
        )
    lowered = schedule if schedule.lowered else lower(schedule)
    transfer = cost.transfer_time()
    tails, heads = _executor_work(lowered, cost)
    opened, pair_of = _open_pairs(lowered)
    # a pair's work after it follows its second half, its work before it precedes its first
    tails = {(r, a.sub[1] if a.kind is Kind.OVERLAP_F_B else a): t for (r, a), t in tails.items()}
    heads = {(r, a.sub[0] if a.kind is Kind.OVERLAP_F_B else a): t for (r, a), t in heads.items()}
    extra = _busy_extras(opened, cost)
    speedup = _lent_speedups(lowered, cost)

    def duration(rank: int, a: Action) -> float:
        key = (rank, a)
        if a.kind.is_compute:
            compute = cost.action_duration(a) / speedup.get((rank, pair_of.get(key, a)), 1.0)
            own = compute + extra.get(key, 0.0) + heads.get(key, 0.0)
        elif a.kind in _SENDS:
            own = cost.send_overhead_s
        else:
            own = 0.0
        return own + tails.get(key, 0.0)

    def latency(a: Action) -> float:
        # ``a`` waits for its SEND, whose end includes any work the sender did after
        # posting it: the message left when it was posted
        send = _matching_send(a)
        if send is None:
            return transfer
        return transfer - tails.get((lowered.placement.rank_of(send.stage), send), 0.0)

    run = execute(opened, duration, latency)
    timeline: dict[int, list[TimedAction]] = {}
    for rank, row in run.timeline.items():
        out: list[TimedAction] = []
        first_half: dict[Action, TimedAction] = {}
        for t in row:
            key = (rank, t.action)
            t = replace(t, start=t.start + heads.get(key, 0.0), end=t.end - tails.get(key, 0.0))
            pair = pair_of.get(key)
            if pair is None:
                out.append(t)
            elif t.action == pair.sub[0]:
                first_half[pair] = t
            else:  # the pair as one action, busy for its two halves (a wait between is idle)
                f = first_half.pop(pair)
                busy = (f.end - f.start) + (t.end - t.start)
                out.append(TimedAction(rank, pair, t.end - busy, t.end, f.ready))
        timeline[rank] = out
    peak_act, peak_total = peak_memory(lowered, cost)
    dp_end = _dp_reduction(timeline, cost) if cost.dp_reduce_s else {}
    return SimResult(lowered, cost, Execution(timeline), peak_act, peak_total, dp_end)


def _dp_reduction(timeline: dict[int, list[TimedAction]], cost: CostModel) -> dict[int, float]:
    """When each rank's data-parallel gradient reduction ends.

    A stage's grads are complete, bucket by bucket, while its last weight-grad action
    of the step (B, W, or a pair holding a B) runs: bucket k of n is ready at
    ``start + (k+1)/n`` of it and goes out then, one bucket at a time per rank (one
    communication stream), so all but the last ones overlap the remaining backward.
    ZeRO-1's parameter all-gather (``dp_after_s``) follows the last bucket.
    """
    ends: dict[int, float] = {}
    for rank, row in timeline.items():
        last: dict[int, TimedAction] = {}
        for t in row:
            for part in t.action.parts:
                if part.kind in (Kind.B, Kind.W):
                    last[part.stage] = t
        ready: list[tuple[float, float]] = []  # (ready at, seconds) per bucket
        after = 0.0
        for stage, t in last.items():
            n = cost.dp_buckets[stage] if cost.dp_buckets else 1
            each = cost.dp_reduce_s[stage] / n
            ready += [(t.start + (t.end - t.start) * (k + 1) / n, each) for k in range(n)]
            after += cost.stage_value("dp_after_s", stage)
        clock = max((t.end for t in row), default=0.0)
        free = 0.0
        for at, seconds in sorted(ready):
            free = max(free, at) + seconds
        ends[rank] = max(clock, free) + after
    return ends


_SENDS = (Kind.SEND_F, Kind.SEND_B)
_RECVS = (Kind.RECV_F, Kind.RECV_B)


def _matching_send(a: Action) -> Action | None:
    if a.kind is Kind.RECV_F:
        return Action(a.stage - 1, Kind.SEND_F, a.microbatch)
    if a.kind is Kind.RECV_B:
        return Action(a.stage + 1, Kind.SEND_B, a.microbatch)
    return None


def _executor_work(
    lowered: Schedule, cost: CostModel
) -> tuple[dict[tuple[int, Action], float], dict[tuple[int, Action], float]]:
    """Seconds of executor work before each compute action: (tails, heads).

    Before compute action ``c`` the runtime posts the receives that come after ``c`` up
    to the next compute action, and does its bookkeeping; this happens after the
    previous compute and its sends, and before ``c`` waits for its input. It is charged
    as a tail of the action just before (the last SEND after the previous compute, or
    that compute itself), keyed by that action. Before a rank's first compute there is
    no such action: the work is a head of the compute itself, unless the rank first
    waits for a receive (the work then overlaps the wait). Both are cut off again after
    the run, so they show as idle time.
    """
    tails: dict[tuple[int, Action], float] = {}
    heads: dict[tuple[int, Action], float] = {}
    if not (cost.recv_overhead_s or cost.action_overhead_s):
        return tails, heads
    for rank, acts in lowered.actions.items():
        carrier: Action | None = None  # the last compute or SEND seen
        waited = False  # a receive came before the first compute
        for i, a in enumerate(acts):
            if not a.kind.is_compute:
                if a.kind in _SENDS:
                    carrier = a
                waited = waited or a.kind in _RECVS
                continue
            posts = 0
            for nxt in acts[i + 1:]:
                if nxt.kind.is_compute:
                    break
                posts += nxt.kind in _RECVS
            work = cost.action_overhead_s + posts * cost.recv_overhead_s
            if carrier is not None:
                tails[(rank, carrier)] = tails.get((rank, carrier), 0.0) + work
            elif not waited:
                heads[(rank, a)] = work
            carrier = a
    return tails, heads


def _busy_extras(opened: Schedule, cost: CostModel) -> dict[tuple[int, Action], float]:
    """Busy seconds the runtime adds to single compute actions (pairs opened).

    Each rank's first compute action gets ``step_start_s``; each message
    ``message_compute_s`` on the action consuming it and on the sender's next one.
    """
    extra: dict[tuple[int, Action], float] = {}

    def add(key: tuple[int, Action], seconds: float) -> None:
        if seconds:
            extra[key] = extra.get(key, 0.0) + seconds

    for rank, acts in opened.actions.items():
        computes = [i for i, a in enumerate(acts) if a.kind.is_compute]
        if computes:
            add((rank, acts[computes[0]]), cost.step_start_s)
        for i, a in enumerate(acts):
            if a.kind in _RECVS or a.kind in _SENDS:
                nxt = next((b for b in acts[i + 1:] if b.kind.is_compute), None)
                if nxt is not None:
                    add((rank, nxt), cost.message_compute_s)
    return extra


def _lent_speedups(lowered: Schedule, cost: CostModel) -> dict[tuple[int, Action], float]:
    """Per (rank, compute action), how much faster lent cores make it (``thread_speedup``)."""
    if not cost.thread_speedup:
        return {}
    own = Schedule.build(lowered.name, lowered.num_microbatches, lowered.placement,
                         {r: [a for a in acts if a.kind.is_compute]
                          for r, acts in lowered.actions.items()})
    top = len(cost.thread_speedup)
    return {(r, a): cost.thread_speedup[min(k, top) - 1]
            for r, row in core_shares(own).items() for a, k in row.items()}


def _open_pairs(lowered: Schedule) -> tuple[Schedule, dict[tuple[int, Action], Action]]:
    """The schedule as the executor runs it: an overlapped pair's forward, then its backward.

    The default executor (``run_in_order``) computes the pair's forward as soon as its
    input is there and waits for the backward's input only after it; so the receive of
    the backward moves between the halves. Returns that schedule and, per (rank, half),
    the pair it came from.
    """
    if not any(a.kind is Kind.OVERLAP_F_B for acts in lowered.actions.values() for a in acts):
        return lowered, {}
    rows: dict[int, list[Action]] = {}
    pair_of: dict[tuple[int, Action], Action] = {}
    for rank, acts in lowered.actions.items():
        row: list[Action] = []
        for a in acts:
            if a.kind is not Kind.OVERLAP_F_B:
                row.append(a)
                continue
            f, b = a.sub
            recvs: list[Action] = []  # the receives lowering put right before the pair
            while row and row[-1].kind in _RECVS:
                recvs.insert(0, row.pop())
            mine = [r for r in recvs if r.kind is Kind.RECV_F and r.stage == f.stage
                    and r.microbatch == f.microbatch]
            row += mine + [f] + [r for r in recvs if r not in mine] + [b]
            pair_of[(rank, f)] = pair_of[(rank, b)] = a
        rows[rank] = row
    opened = Schedule.build(lowered.name, lowered.num_microbatches, lowered.placement, rows,
                            lowered=True)
    return opened, pair_of
