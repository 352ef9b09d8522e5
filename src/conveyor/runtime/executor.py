"""Run one rank's lowered action list for one step.

The executor knows actions, not schedules: it steps through the list, posts each
send as soon as its tensor exists and each receive ahead of the computation that
consumes it (waiting only there), and hands compute actions to the stage runners.
Completed sends are let go at once, so a rank holds O(stages in flight), not
O(microbatches), boundary tensors. If anything fails (a timeout, a dead peer, an
error in a block) it raises :class:`PipelineError` with the rank x step grid and the
failing action marked, after clearing every trace of the step from the stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..log import get_logger
from ..memory import ActivationMeter
from ..schedules.ir import Action, Kind, Schedule, format_table
from ..schedules.validate import TimedAction
from ..threads import intra_op_threads
from .comm import P2P, CommTimeout, Posted
from .stage import StageRunner

__all__ = ["Executor", "OverlapHook", "PipelineError", "StepInputs", "run_in_order"]

log = get_logger(__name__)

_SENDS = (Kind.SEND_F, Kind.SEND_B)
_RECVS = (Kind.RECV_F, Kind.RECV_B)


OverlapHook = Callable[[Action, Callable[[], None], Action, Callable[[], None]], None]
"""Runs an overlapped pair, given each half's action and a thunk that computes it."""


def run_in_order(f: Action, run_f: Callable[[], None], b: Action, run_b: Callable[[], None]) -> None:
    """The default overlap: the forward, then the backward."""
    del f, b
    run_f()
    run_b()


class PipelineError(RuntimeError):
    """A rank could not complete an action; the message names it and shows the grid."""


@dataclass
class StepInputs:
    """Per-microbatch inputs (for the first stage) and targets (for the last).

    Each is a tensor (a decoder's tokens and targets) or a dict of named tensors.
    """

    inputs: list[Any]
    targets: list[Any]


@dataclass
class _StepState:
    recv: dict[Action, Posted] = field(default_factory=dict)  # posted, not yet consumed
    sends: list[Posted] = field(default_factory=list)  # posted, not yet complete
    # tensors waiting for their SEND action: stage outputs (F) or input grads (B)
    outgoing: dict[Action, dict[str, Tensor]] = field(default_factory=dict)
    # handovers between stages on this rank (V placement), keyed like receives
    local: dict[Action, dict[str, Tensor]] = field(default_factory=dict)


class Executor:
    """Runs the lowered actions of one pipeline rank over its stage runners."""

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stages: dict[int, StageRunner],
        p2p: P2P | None,
        *,
        train: bool = True,
        meter: ActivationMeter | None = None,
    ) -> None:
        if not schedule.lowered:
            raise ValueError("Executor needs a lowered schedule; call schedules.lower() first")
        self.schedule = schedule
        self.rank = rank
        self.actions = schedule.actions[rank]
        self.stages = stages
        self.p2p = p2p
        self.train = train
        self.meter = meter or ActivationMeter()
        self.last_stage = schedule.num_stages - 1
        self.record = False  # when True, run() keeps the last step's timeline
        # how an OVERLAP_F_B pair runs: (forward, run_forward, backward, run_backward);
        # one after the other unless a custom overlap (e.g. two CUDA streams) is set
        self.overlap: OverlapHook = run_in_order
        # called with a stage once its grads are final for the step (e.g. to start the
        # data-parallel reduction of that stage while the rest of the pipeline runs)
        self.after_stage_done: Callable[[int], None] | None = None
        # called with a stage just before the action that makes its grads final runs
        # (e.g. to start reducing each bucket of grads as soon as backward completes it)
        self.before_stage_done: Callable[[int], None] | None = None
        # compute actions that run on more intra-op threads than the rank's own: the
        # cores of ranks that are idle by construction while they run (runtime.lending)
        self.threads: dict[Action, int] = {}
        self.timeline: list[TimedAction] = []
        self._t0 = 0.0
        self._index = {a: i for i, a in enumerate(self.actions)}
        # decided once, not per action per step: what each index does, and for every
        # compute action the receive it takes its input from and the hand-over it makes
        self._compute_at = [a.kind.is_compute for a in self.actions]
        self._send_at = [a.kind in _SENDS for a in self.actions]
        self._links = {p: _links_of(p, self.last_stage)
                       for a in self.actions if a.kind.is_compute for p in a.parts}
        comm = [i for i, a in enumerate(self.actions) if not a.kind.is_compute]
        self._last_comm = comm[-1] if comm else -1
        self._prefetch = self._plan_prefetch()
        self.stage_done_at = self._plan_stage_done()
        self._done_after: dict[int, list[int]] = {}
        for s, j in sorted(self.stage_done_at.items()):
            self._done_after.setdefault(j, []).append(s)

    def _plan_stage_done(self) -> dict[int, int]:
        """For each stage, the index of this rank's last action that writes its weight-grads.

        That is its last B, I or W (an I writes the grads of non-linear parameters,
        its W those of the linear ones), counting the backward half of an overlapped pair.
        """
        done: dict[int, int] = {}
        for i, a in enumerate(self.actions):
            for part in a.sub if a.kind is Kind.OVERLAP_F_B else (a,):
                if part.kind in (Kind.B, Kind.I, Kind.W):
                    done[part.stage] = i
        return done

    def _plan_prefetch(self) -> dict[int, list[int]]:
        """For each compute step, the receives (by index) to post before running it.

        Receives up to the *next* compute action are posted ahead, so their data
        arrives while this rank computes. Safe on every backend: a receive's group
        holds only receives from one peer, in the order they are consumed.
        """
        plan: dict[int, list[int]] = {}
        computes = [i for i, a in enumerate(self.actions) if a.kind.is_compute]
        for ci, i in enumerate(computes):
            horizon = computes[ci + 1] if ci + 1 < len(computes) else len(self.actions)
            plan[i] = [j for j in range(i + 1, horizon) if self.actions[j].kind in _RECVS]
        return plan

    def run(self, data: StepInputs) -> None:
        """Run every action of this rank for one step."""
        if self.p2p is not None and self.p2p.broken is not None:
            raise PipelineError(
                f"rank {self.rank}: an earlier step failed with communication in flight "
                f"({self.p2p.broken}); messages between stages may be out of step, so this pipeline "
                "cannot run another step. Restart the ranks (a run resumes from its checkpoint)"
            )
        state = _StepState()
        self._t0 = time.perf_counter()
        if self.record:
            self.timeline = []
        i = 0
        try:
            for i, a in enumerate(self.actions):
                if self._compute_at[i]:
                    for j in self._prefetch[i]:
                        self._post_recv(state, self.actions[j])
                    if self.before_stage_done is not None:
                        for s in self._done_after.get(i, ()):
                            self.before_stage_done(s)
                    self._compute(a, state, data)
                    self._release_sends(state, wait=False)
                    if self.after_stage_done is not None:
                        for s in self._done_after.get(i, ()):
                            self.after_stage_done(s)
                elif self._send_at[i]:
                    assert self.p2p is not None
                    posted = self.p2p.post(a, state.outgoing.pop(a))
                    self.meter.add(posted.nbytes, "send")
                    state.sends.append(posted)
                else:
                    self._post_recv(state, a)
            self._release_sends(state, wait=True)
        except _ActionFailed as err:
            self._abandon(state, err.index, err.reason)
            raise self._error(err.index, err.reason) from err.__cause__
        except (CommTimeout, RuntimeError, ValueError) as err:
            reason = f"{type(err).__name__}: {err}"
            self._abandon(state, i, reason)
            raise self._error(i, reason) from err

    # -- communication -------------------------------------------------------------

    def _post_recv(self, state: _StepState, a: Action) -> None:
        if a not in state.recv:
            assert self.p2p is not None
            state.recv[a] = self.p2p.post(a)

    def _release_sends(self, state: _StepState, *, wait: bool) -> None:
        """Let completed sends go (all of them, waiting, at the end of the step)."""
        keep = []
        for posted in state.sends:
            if wait:
                try:
                    assert self.p2p is not None
                    self.p2p.wait(posted)
                except CommTimeout as err:
                    raise _ActionFailed(self._index[posted.action], str(err)) from err
            elif not posted.done():
                keep.append(posted)
                continue
            self.meter.release(posted.nbytes, "send")
        state.sends = keep

    def _abandon(self, state: _StepState, index: int, reason: str) -> None:
        """Clear the step; note if messages may still be in flight between ranks."""
        for stage in self.stages.values():
            stage.reset()
        self.meter.reset()
        # Past this rank's last communication, a clean failure leaves nothing in flight
        # once its sends complete; before it, a peer may have sent what nobody will take.
        broken = index <= self._last_comm or any(not p.done() for p in state.recv.values())
        if not broken and self.p2p is not None:
            try:
                for posted in state.sends:
                    self.p2p.wait(posted)
            except CommTimeout:
                broken = True
        if broken and self.p2p is not None:
            a = self.actions[index]
            self.p2p.mark_broken(f"rank {self.rank} failed at {a}: {reason}".splitlines()[0])

    # -- computation ---------------------------------------------------------------

    def _take(self, state: _StepState, key: Action) -> dict[str, Tensor]:
        """The tensors ``key`` names: received from a peer (waiting here), or handed over."""
        posted = state.recv.pop(key, None)
        if posted is None:
            return state.local.pop(key)
        t0 = time.perf_counter()
        try:
            assert self.p2p is not None
            self.p2p.wait(posted)
        except CommTimeout as err:
            raise _ActionFailed(self._index[key], str(err)) from err
        if self.record:
            self._note(key, t0, time.perf_counter())
        return posted.tensors

    def _compute(self, a: Action, state: _StepState, data: StepInputs) -> None:
        t0 = time.perf_counter()
        threads = self.threads.get(a) if self.threads else None
        if threads is None:
            self._compute_parts(a, state, data)
        else:
            with intra_op_threads(threads):
                self._compute_parts(a, state, data)
        if self.record:
            self._note(a, t0, time.perf_counter())

    def _compute_parts(self, a: Action, state: _StepState, data: StepInputs) -> None:
        if a.kind is Kind.OVERLAP_F_B:
            f, b = a.sub
            self.overlap(f, lambda: self._run_one(f, state, data),
                         b, lambda: self._run_one(b, state, data))
        else:
            self._run_one(a, state, data)

    def _run_one(self, a: Action, state: _StepState, data: StepInputs) -> None:
        stage = self.stages[a.stage]
        source, hand_over = self._links[a]
        if a.kind is Kind.F:
            targets = data.targets[a.microbatch] if a.stage == self.last_stage else None
            inputs = data.inputs[a.microbatch] if source is None else self._take(state, source)
            out = stage.forward(a.microbatch, inputs, targets, train=self.train)
            if hand_over is not None:
                self._hand_over(*hand_over, out, state)
        elif a.kind is Kind.W:
            stage.weight(a.microbatch)
        else:
            grad_out = None if source is None else self._take(state, source)
            grad_in = stage.backward(a.microbatch, grad_out, defer_weights=a.kind is Kind.I)
            if hand_over is not None:
                assert grad_in is not None
                self._hand_over(*hand_over, grad_in, state)

    def _hand_over(
        self, send: Action, recv: Action, tensors: dict[str, Tensor], state: _StepState
    ) -> None:
        if recv.stage in self.stages:  # next/previous stage lives here: no transfer
            state.local[recv] = {k: t.detach() for k, t in tensors.items()}
        else:
            state.outgoing[send] = tensors

    # -- reporting -----------------------------------------------------------------

    def _note(self, a: Action, start: float, end: float) -> None:
        t0 = self._t0  # seconds since this step began on this rank
        self.timeline.append(TimedAction(self.rank, a, start - t0, end - t0, start - t0))

    def _error(self, index: int, reason: str) -> PipelineError:
        a = self.actions[index]
        grid = format_table({self.rank: self.actions}, marks=[(self.rank, index)])
        msg = (
            f"rank {self.rank} failed at its action #{index}, {a} "
            f"(stage {a.stage}, microbatch {a.microbatch}): {reason}\n{grid}"
        )
        log.error(msg)
        return PipelineError(msg)


def _links_of(a: Action, last: int) -> tuple[Action | None, tuple[Action, Action] | None]:
    """The receive a compute action takes its input from (None: the batch, or nothing),
    and the (send, receive) pair its output goes out as (None: it makes none)."""
    s, m = a.stage, a.microbatch
    if a.kind is Kind.F:
        return (Action(s, Kind.RECV_F, m) if s > 0 else None,
                (Action(s, Kind.SEND_F, m), Action(s + 1, Kind.RECV_F, m)) if s < last else None)
    if a.kind.is_backward:
        return (Action(s, Kind.RECV_B, m) if s < last else None,
                (Action(s, Kind.SEND_B, m), Action(s - 1, Kind.RECV_B, m)) if s > 0 else None)
    return None, None  # W: its input is its own I's, it hands nothing over


class _ActionFailed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason
