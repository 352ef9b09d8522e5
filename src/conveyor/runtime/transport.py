"""How batches of point-to-point operations reach the backend.

A transport issues one batch of sends and receives (all in one process group) and
returns the backend's works for it; it also warms each process group up with a
collective of all its ranks before its first batch, because NCCL leaves a first
batched call among a subset of a group's ranks undefined. :class:`TorchTransport`
is the real thing on every backend; ``nccl_semantics.NcclSemantics`` imposes NCCL's
rules on gloo so that the CPU test suite runs the code path GPU users run.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

__all__ = ["Transport", "TorchTransport", "works_per_op"]


class Transport(Protocol):
    """Issues batches of p2p operations."""

    def warm_up(self, group: dist.ProcessGroup) -> None:
        """First use of ``group``: a collective of all its ranks (collective call)."""

    def batch(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """Issue ``ops`` (one process group) together; the backend's works for them."""
        ...


class TorchTransport:
    """``torch.distributed`` as it is: gloo gives one work per op, NCCL one per batch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._warm: set[int] = set()

    def warm_up(self, group: dist.ProcessGroup) -> None:
        """All-reduce one element over ``group`` (creates NCCL's communicator collectively)."""
        if id(group) not in self._warm:
            dist.all_reduce(torch.zeros(1, device=self.device), group=group)
            self._warm.add(id(group))

    def batch(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """``dist.batch_isend_irecv``."""
        return dist.batch_isend_irecv(ops)


def works_per_op(ops: list[dist.P2POp], works: list[dist.Work]) -> list[dist.Work]:
    """Map a batch's works onto its ops: one per op (gloo) or one for all (NCCL)."""
    if len(works) == len(ops):
        return works
    if len(works) == 1:
        return works * len(ops)
    raise RuntimeError(
        f"the backend returned {len(works)} works for a batch of {len(ops)} p2p operations; "
        "expected one per operation or one for the whole batch"
    )
