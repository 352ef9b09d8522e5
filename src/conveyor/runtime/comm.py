"""Point-to-point transfers between pipeline stages over ``torch.distributed``.

Shapes and dtypes are agreed once per (boundary, direction, microbatch shape): the
first transfer carries a small metadata tensor, later ones only the payload. Every
wait has a timeout and raises :class:`CommTimeout`, which the executor turns into a
message naming the action it was waiting on.

Gloo matches messages by tag, so receives can be posted ahead in any order. NCCL
ignores tags and matches by order, so activations and gradients travel in two
process groups of their own: between two ranks, the order of one kind of message
agrees on both sides for every schedule (the schedule tests check it), while the
interleaving of the two kinds need not (ZB-V). There the executor also issues each
gap of communication between two computations as one batch (``batch_isend_irecv``
per group), the way the peer issues its mirror image.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..schedules.ir import Action, Kind

__all__ = ["CommTimeout", "P2P", "Transfer", "wait_work"]

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_MAX_DIMS = 6
_KIND_CODE = {Kind.SEND_F: 0, Kind.RECV_F: 0, Kind.SEND_B: 1, Kind.RECV_B: 1}


class CommTimeout(RuntimeError):
    """A send or receive did not complete within the timeout."""


@dataclass
class Transfer:
    """One posted operation and, for receives, the buffer it fills."""

    action: Action
    work: dist.Work | None
    buffer: torch.Tensor | None = None


class P2P:
    """Sends and receives of activations (F direction) and their grads (B direction)."""

    def __init__(
        self,
        groups: tuple[dist.ProcessGroup | None, dist.ProcessGroup | None],
        stage_ranks: Sequence[int],
        num_stages: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        self.groups = groups  # (activations, gradients)
        self.stage_ranks = list(stage_ranks)  # global rank holding each stage
        self.num_stages = num_stages
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._meta: dict[tuple[int, int, tuple[int, ...]], tuple[torch.Size, torch.dtype]] = {}
        self._sent_meta: set[tuple[int, int, tuple[int, ...]]] = set()
        self.key: tuple[int, ...] = ()

    # Each boundary between stage s and s+1 carries activations forward and grads back.
    def _boundary(self, a: Action) -> int:
        return a.stage if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1

    def _peer(self, a: Action) -> int:
        if a.kind in (Kind.SEND_F, Kind.RECV_B):
            return self.stage_ranks[a.stage + 1]
        return self.stage_ranks[a.stage - 1]

    def _group(self, a: Action) -> dist.ProcessGroup | None:
        return self.groups[_KIND_CODE[a.kind]]

    def _tag(self, a: Action, meta: bool) -> int:
        code = _KIND_CODE[a.kind] + (2 if meta else 0)
        return (a.microbatch * self.num_stages + self._boundary(a)) * 4 + code

    def _meta_key(self, a: Action) -> tuple[int, int, tuple[int, ...]]:
        return (_KIND_CODE[a.kind], self._boundary(a), self.key)

    def needs_meta(self, a: Action) -> bool:
        """True if ``a`` still has to exchange shape/dtype metadata before its payload."""
        key = self._meta_key(a)
        return key not in (self._sent_meta if a.kind in (Kind.SEND_F, Kind.SEND_B) else self._meta)

    def meta_ops(self, a: Action, tensor: torch.Tensor | None) -> tuple[dist.P2POp, torch.Tensor]:
        """The metadata message for a send (``tensor`` given) or a receive."""
        peer = self._peer(a)
        if tensor is not None:
            self._sent_meta.add(self._meta_key(a))
            dims = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
            buf = torch.tensor(
                [tensor.dim(), _DTYPES.index(tensor.dtype), *dims], dtype=torch.int64,
                device=self.device,
            )
            return dist.P2POp(dist.isend, buf, peer, self._group(a), self._tag(a, True)), buf
        buf = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
        return dist.P2POp(dist.irecv, buf, peer, self._group(a), self._tag(a, True)), buf

    def store_meta(self, a: Action, buf: torch.Tensor) -> None:
        """Remember the shape/dtype announced in a received metadata buffer."""
        vals = buf.tolist()
        ndim, dtype = int(vals[0]), _DTYPES[int(vals[1])]
        self._meta[self._meta_key(a)] = (torch.Size(vals[2 : 2 + ndim]), dtype)

    def payload_op(self, a: Action, tensor: torch.Tensor | None) -> tuple[dist.P2POp, torch.Tensor]:
        """The payload message of a send (``tensor``) or a receive (buffer allocated here)."""
        peer = self._peer(a)
        if tensor is not None:
            tensor = tensor.contiguous()
            return dist.P2POp(dist.isend, tensor, peer, self._group(a), self._tag(a, False)), tensor
        shape, dtype = self._meta[self._meta_key(a)]
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return dist.P2POp(dist.irecv, buf, peer, self._group(a), self._tag(a, False)), buf

    def start(self, ops: list[dist.P2POp], batched: bool) -> list[dist.Work]:
        """Issue operations: as one NCCL group when ``batched``, else one by one."""
        if not ops:
            return []
        if batched:  # one batch per group, as batch_isend_irecv requires
            by_group: dict[int, list[dist.P2POp]] = {}
            for op in ops:
                by_group.setdefault(id(op.group), []).append(op)
            works = {id(op): w for batch in by_group.values()
                     for op, w in zip(batch, dist.batch_isend_irecv(batch), strict=True)}
            return [works[id(op)] for op in ops]
        return [
            op.op(op.tensor, op.peer, group=op.group, tag=op.tag)  # type: ignore[misc]
            for op in ops
        ]

    def wait(self, work: dist.Work | None, what: Action) -> None:
        """Wait for ``work`` or raise CommTimeout naming ``what``."""
        wait_work(work, self.timeout, str(what))


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
