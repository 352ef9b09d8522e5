"""Run one rank's lowered action list for one step.

The executor knows actions, not schedules: it steps through the list, posts
receives ahead of the computation that needs them, and hands compute actions to
the stage runners. If anything fails (a timeout, a dead peer, an error in a
block) it raises :class:`PipelineError` with the rank x step grid, the failing
action marked, so that the log says where the pipeline stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from ..log import get_logger
from ..schedules.ir import Action, Kind, Schedule, format_table
from ..schedules.validate import TimedAction
from .comm import P2P, CommTimeout, Transfer
from .stage import StageRunner

__all__ = ["Executor", "PipelineError", "StepInputs"]

log = get_logger(__name__)


class PipelineError(RuntimeError):
    """A rank could not complete an action; the message names it and shows the grid."""


@dataclass
class StepInputs:
    """Per-microbatch tokens (for the first stage) and targets (for the last)."""

    inputs: list[Tensor]
    targets: list[Tensor]


@dataclass
class _StepState:
    recv: dict[Action, Transfer] = field(default_factory=dict)
    sends: list[Transfer] = field(default_factory=list)
    # tensors waiting to leave: stage output per mb (F) or input grad per mb (B)
    outgoing: dict[Action, Tensor] = field(default_factory=dict)
    # handovers between stages on this rank (V placement), keyed like receives
    local: dict[Action, Tensor] = field(default_factory=dict)


class Executor:
    """Runs the lowered actions of one pipeline rank over its stage runners."""

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stages: dict[int, StageRunner],
        p2p: P2P,
        *,
        batched_comm: bool = False,
        train: bool = True,
    ) -> None:
        if not schedule.lowered:
            raise ValueError("Executor needs a lowered schedule; call schedules.lower() first")
        self.schedule = schedule
        self.rank = rank
        self.actions = schedule.actions[rank]
        self.stages = stages
        self.p2p = p2p
        self.batched = batched_comm
        self.train = train
        self.last_stage = schedule.num_stages - 1
        self.record = False  # when True, run() keeps the last step's timeline
        self.timeline: list[TimedAction] = []
        self._t0 = 0.0
        self._prefetch = self._plan_prefetch()

    def _plan_prefetch(self) -> dict[int, list[int]]:
        """For each compute step, the receives (by index) to post before running it.

        Receives up to the *next* compute action are posted ahead, so their data
        arrives while this rank computes. Batched (NCCL) mode posts nothing ahead:
        its gaps must mirror the peer's exactly.
        """
        plan: dict[int, list[int]] = {}
        if self.batched:
            return plan
        computes = [i for i, a in enumerate(self.actions) if a.kind.is_compute]
        for ci, i in enumerate(computes):
            horizon = computes[ci + 1] if ci + 1 < len(computes) else len(self.actions)
            plan[i] = [
                j for j in range(i + 1, horizon)
                if self.actions[j].kind in (Kind.RECV_F, Kind.RECV_B)
            ]
        return plan

    def run(self, data: StepInputs) -> None:
        """Run every action of this rank for one step."""
        state = _StepState()
        self._t0 = time.perf_counter()
        if self.record:
            self.timeline = []
        i = 0
        n = len(self.actions)
        while i < n:
            a = self.actions[i]
            try:
                if a.kind.is_compute:
                    # Posting ahead must never block: a receive whose shape is not agreed
                    # yet waits for its own gap.
                    ahead = [self.actions[j] for j in self._prefetch.get(i, ())]
                    self._post_recvs(state, [r for r in ahead if not self.p2p.needs_meta(r)])
                    self._compute(a, state, data)
                    i += 1
                else:
                    j = i
                    while j < n and not self.actions[j].kind.is_compute:
                        j += 1
                    self._communicate(self.actions[i:j], state, first_index=i)
                    i = j
            except _ActionFailed as err:
                raise self._error(err.index, err.reason) from err.__cause__
            except (CommTimeout, RuntimeError, ValueError) as err:
                raise self._error(i, f"{type(err).__name__}: {err}") from err
        for t in state.sends:
            try:
                self.p2p.wait(t.work, t.action)
            except CommTimeout as err:
                raise self._error(self.actions.index(t.action), str(err)) from err

    # -- communication -------------------------------------------------------------

    def _post_recvs(self, state: _StepState, acts: list[Action]) -> None:
        todo = [a for a in acts if a not in state.recv]
        if not todo:
            return
        meta = [(a, *self.p2p.meta_ops(a, None)) for a in todo if self.p2p.needs_meta(a)]
        if meta:  # first use of this boundary: learn shape and dtype before allocating
            works = self.p2p.start([op for _, op, _ in meta], self.batched)
            for (a, _, buf), w in zip(meta, works, strict=True):
                self.p2p.wait(w, a)
                self.p2p.store_meta(a, buf)
        ops = [self.p2p.payload_op(a, None) for a in todo]
        works = self.p2p.start([op for op, _ in ops], self.batched)
        for a, (_, buf), w in zip(todo, ops, works, strict=True):
            state.recv[a] = Transfer(a, w, buf)

    def _communicate(self, acts: list[Action], state: _StepState, first_index: int) -> None:
        """One gap between computations: post its sends and receives (NCCL: as one batch)."""
        sends = [a for a in acts if a.kind in (Kind.SEND_F, Kind.SEND_B)]
        recvs = [a for a in acts if a.kind in (Kind.RECV_F, Kind.RECV_B)]
        t0 = time.perf_counter()
        meta_sends: list[tuple[Action, tuple[dist.P2POp, Tensor]]] = []
        payload: list[tuple[Action, tuple[dist.P2POp, Tensor]]] = []
        for a in sends:
            tensor = state.outgoing.pop(a)
            if self.p2p.needs_meta(a):
                meta_sends.append((a, self.p2p.meta_ops(a, tensor)))
            payload.append((a, self.p2p.payload_op(a, tensor)))
        if self.batched:
            # Mirror of the peer's gap: metadata of sends and receives in one group, then
            # payloads in one group.
            recv_meta = [(a, self.p2p.meta_ops(a, None)) for a in recvs if self.p2p.needs_meta(a)]
            works = self.p2p.start([op for _, (op, _) in meta_sends + recv_meta], True)
            for w in works:
                self.p2p.wait(w, acts[0])
            for a, (_, buf) in recv_meta:
                self.p2p.store_meta(a, buf)
            recv_ops = [(a, self.p2p.payload_op(a, None)) for a in recvs]
            works = self.p2p.start([op for _, (op, _) in payload + recv_ops], True)
            for (a, (_, buf)), w in zip(payload + recv_ops, works, strict=True):
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    state.recv[a] = Transfer(a, w, buf)
                else:
                    state.sends.append(Transfer(a, w, buf))
        else:
            # Metadata before payload; both stay referenced until the step's end so their
            # buffers outlive the asynchronous sends.
            for group in (meta_sends, payload):
                works = self.p2p.start([op for _, (op, _) in group], False)
                for (a, (_, buf)), w in zip(group, works, strict=True):
                    state.sends.append(Transfer(a, w, buf))
            self._post_recvs(state, recvs)
        for a in recvs:
            try:
                self.p2p.wait(state.recv[a].work, a)
            except CommTimeout as err:
                raise _ActionFailed(first_index + acts.index(a), str(err)) from err
            self._note(a, t0, time.perf_counter())

    # -- computation ---------------------------------------------------------------

    @staticmethod
    def _take(state: _StepState, key: Action) -> Tensor:
        """The tensor ``key`` names: received from a peer, or handed over on this rank."""
        if key in state.recv:
            return state.recv.pop(key).buffer  # type: ignore[return-value]
        return state.local.pop(key)

    def _input(self, a: Action, state: _StepState, data: StepInputs) -> Tensor:
        if a.stage == 0:
            return data.inputs[a.microbatch]
        return self._take(state, Action(a.stage, Kind.RECV_F, a.microbatch))

    def _output_grad(self, a: Action, state: _StepState) -> Tensor | None:
        if a.stage == self.last_stage:
            return None
        return self._take(state, Action(a.stage, Kind.RECV_B, a.microbatch))

    def _compute(self, a: Action, state: _StepState, data: StepInputs) -> None:
        t0 = time.perf_counter()
        stage = self.stages[a.stage]
        if a.kind is Kind.F:
            targets = data.targets[a.microbatch] if a.stage == self.last_stage else None
            out = stage.forward(a.microbatch, self._input(a, state, data), targets, train=self.train)
            if a.stage < self.last_stage:
                self._hand_over(Action(a.stage, Kind.SEND_F, a.microbatch),
                                Action(a.stage + 1, Kind.RECV_F, a.microbatch), out, state)
        elif a.kind is Kind.B:
            grad_in = stage.backward(a.microbatch, self._output_grad(a, state))
            if a.stage > 0:
                assert grad_in is not None
                self._hand_over(Action(a.stage, Kind.SEND_B, a.microbatch),
                                Action(a.stage - 1, Kind.RECV_B, a.microbatch), grad_in, state)
        else:
            stage.weight(a.microbatch)
        self._note(a, t0, time.perf_counter())

    def _hand_over(self, send: Action, recv: Action, tensor: Tensor, state: _StepState) -> None:
        if recv.stage in self.stages:  # next/previous stage lives here: no transfer
            state.local[recv] = tensor.detach()
        else:
            state.outgoing[send] = tensor

    # -- reporting -----------------------------------------------------------------

    def _note(self, a: Action, start: float, end: float) -> None:
        if self.record:  # seconds since this step began on this rank
            t0 = self._t0
            self.timeline.append(TimedAction(self.rank, a, start - t0, end - t0, start - t0))

    def _error(self, index: int, reason: str) -> PipelineError:
        a = self.actions[index]
        grid = format_table({self.rank: self.actions}, marks=[(self.rank, index)])
        msg = (
            f"rank {self.rank} failed at step {index}, action {a} "
            f"(stage {a.stage}, microbatch {a.microbatch}): {reason}\n{grid}"
        )
        log.error(msg)
        return PipelineError(msg)


class _ActionFailed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason

