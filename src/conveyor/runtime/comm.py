"""Point-to-point transfers between pipeline stages: one protocol on every backend.

- **Static shapes.** Every tensor crossing a boundary is described before the step
  by the model's boundary signature (``models/boundary.py``); receivers allocate from
  it and only payloads travel.
- **One process group per link and direction of data.** Activations from rank A to
  rank B, and gradients from A to B, each have a two-rank group of their own. Within a
  group a rank only sends or only receives, in the order of its schedule, which the
  peer's schedule agrees with (checked by the schedule tests). So NCCL's ordered
  matching pairs the right messages, and a group's stream can never hold a send
  behind a receive: the protocol cannot deadlock where the schedule does not.
- **Each action is one batch** of its boundary tensors; the backend may return one
  work per op (gloo) or one for the batch (NCCL), both are mapped.
- Receives are posted ahead and waited on when consumed; sends are released as soon
  as they complete. Every wait has a timeout that names the action.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.boundary import Signature
from ..schedules.ir import Action, Kind
from .buffers import RecvBuffers
from .transport import Transport, works_per_op

__all__ = ["CommTimeout", "P2P", "Posted", "link_of", "wait_work"]

ACT, GRAD = "act", "grad"
_CHANNEL_CODE = {ACT: 0, GRAD: 1}


class CommTimeout(RuntimeError):
    """A send or receive did not complete within the timeout."""


def link_of(a: Action, stage_ranks: Sequence[int]) -> tuple[int, int, str]:
    """(sending rank, receiving rank, channel) of a SEND/RECV action."""
    s = a.stage
    if a.kind is Kind.SEND_F:
        return stage_ranks[s], stage_ranks[s + 1], ACT
    if a.kind is Kind.RECV_F:
        return stage_ranks[s - 1], stage_ranks[s], ACT
    if a.kind is Kind.SEND_B:
        return stage_ranks[s], stage_ranks[s - 1], GRAD
    if a.kind is Kind.RECV_B:
        return stage_ranks[s + 1], stage_ranks[s], GRAD
    raise ValueError(f"{a} is not a communication action")


class _Route(NamedTuple):
    """Where one communication action's tensors go, the same every step."""

    group: dist.ProcessGroup
    peer: int  # global rank sent to or received from
    boundary: int  # the cut crossed: after stage ``boundary``
    channel: str
    grads: bool  # only the boundary tensors that carry a grad travel


@dataclass
class Posted:
    """One action's posted operations: the tensors and the works that move them."""

    action: Action
    tensors: dict[str, Tensor]
    works: list[dist.Work]

    @property
    def nbytes(self) -> int:
        """Bytes held by this transfer's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def done(self) -> bool:
        """True once every work has completed."""
        return all(w.is_completed() for w in self.works)


class P2P:
    """Sends and receives of boundary tensors: activations forward, their grads back."""

    def __init__(
        self,
        groups: dict[tuple[int, int, str], dist.ProcessGroup],
        stage_ranks: Sequence[int],
        transport: Transport,
        device: torch.device,
        timeout_s: float,
        health: dict[str, str] | None = None,
    ) -> None:
        self.groups = groups  # (src rank, dst rank, channel) -> group; this rank's links only
        self.stage_ranks = list(stage_ranks)  # global rank holding each stage
        self.num_stages = len(stage_ranks)
        self.transport = transport
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # signature of the cut after stage s (s -> s+1), set for each step's microbatch shape
        self.signature: Callable[[int], Signature] | None = None
        # shared by every P2P over the same groups: stale messages outlive a pipeline
        self._health = {} if health is None else health
        self.buffers = RecvBuffers()
        self._routes: dict[Action, _Route] = {}

    @property
    def broken(self) -> str | None:
        """Why these groups may hold stale messages (a step failed mid-flight), or None."""
        return self._health.get("broken")

    def mark_broken(self, reason: str) -> None:
        """Refuse every later step over these groups: messages may be out of step."""
        self._health.setdefault("broken", reason)
        self.buffers.clear()  # receives still in flight may write into them

    def _tag(self, a: Action, boundary: int, index: int, channel: str) -> int:
        # unique within a step; gloo matches by it, NCCL ignores it
        return ((a.microbatch * self.num_stages + boundary) * 8 + index) * 2 + _CHANNEL_CODE[channel]

    def _route(self, a: Action) -> _Route:
        route = self._routes.get(a)
        if route is None:  # the same every step: worked out once per action
            src, dst, channel = link_of(a, self.stage_ranks)
            sending = a.kind in (Kind.SEND_F, Kind.SEND_B)
            boundary = a.stage if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1
            route = _Route(self.groups[(src, dst, channel)], dst if sending else src, boundary,
                           channel, grads=channel == GRAD)
            self._routes[a] = route
        return route

    def post(self, a: Action, tensors: dict[str, Tensor] | None = None) -> Posted:
        """Post a send of ``tensors`` or, without them, a receive into a free pooled buffer."""
        assert self.signature is not None, "P2P.signature is set before a step"
        group, peer, boundary, channel, grads = self._route(a)
        sig = self.signature(boundary)
        if grads:
            sig = {name: spec for name, spec in sig.items() if spec.grad}
        sending = tensors is not None
        out: dict[str, Tensor] = {}
        ops: list[dist.P2POp] = []
        for index, (name, spec) in enumerate(sig.items()):
            if sending:
                assert tensors is not None
                if name not in tensors:
                    raise ValueError(f"{a}: stage produced no {name!r}, which its boundary carries")
                spec.check(name, tensors[name], f"{a}")
                t = tensors[name].contiguous()
            else:
                t = self.buffers.take(spec.shape, spec.dtype, self.device)
            out[name] = t
            ops.append(dist.P2POp(dist.isend if sending else dist.irecv, t, peer, group,
                                  self._tag(a, boundary, index, channel)))
        works = works_per_op(ops, self.transport.batch(ops))
        unique = list({id(w): w for w in works}.values())
        return Posted(a, out, unique)

    def wait(self, posted: Posted) -> None:
        """Wait for a posted transfer, or raise CommTimeout naming its action."""
        for w in posted.works:
            wait_work(w, self.timeout, _describe(posted.action))


def _describe(a: Action) -> str:
    what = {Kind.SEND_F: "sending activations of", Kind.RECV_F: "receiving activations of",
            Kind.SEND_B: "sending grads of", Kind.RECV_B: "receiving grads of"}[a.kind]
    return f"{a} ({what} stage {a.stage}, microbatch {a.microbatch})"


def wait_work(work: dist.Work | None, timeout: datetime.timedelta, what: str) -> None:
    """Wait for ``work`` up to ``timeout``; CommTimeout naming ``what`` if it does not finish."""
    if work is None:
        return
    try:
        ok = work.wait(timeout)
    except RuntimeError as err:  # gloo reports timeouts and dead peers as errors
        raise CommTimeout(f"{what}: {err}".splitlines()[0]) from err
    if ok is False:
        raise CommTimeout(f"{what}: timed out after {timeout.total_seconds():.0f}s")
