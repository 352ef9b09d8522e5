"""How batches of point-to-point operations reach the backend.

A transport issues one batch of sends and receives (all in one process group) and
returns the backend's works for it; it also warms each process group up with a
collective of all its ranks before its first batch, because NCCL leaves a first
batched call among a subset of a group's ranks undefined. :class:`TorchTransport`
is the real thing on every backend; ``nccl_semantics.NcclSemantics`` imposes NCCL's
rules on gloo so that the CPU test suite runs the code path GPU users run.
"""

from __future__ import annotations

import datetime
import queue
import threading
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
    """``torch.distributed`` as it is: gloo gives one work per op, NCCL one per batch.

    Gloo's send works report ``is_completed()`` only once someone has waited on them,
    so the executor could never let a delivered send go before the step's end. Here a
    background thread waits on gloo sends in order and the executor sees the works
    through :class:`_WaitedWork`, whose completion is real.
    """

    def __init__(self, device: torch.device, timeout_s: float = 300.0) -> None:
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._warm: set[int] = set()
        self._sends: queue.SimpleQueue[_WaitedWork] | None = None

    def warm_up(self, group: dist.ProcessGroup) -> None:
        """All-reduce one element over ``group`` (creates NCCL's communicator collectively)."""
        if id(group) not in self._warm:
            dist.all_reduce(torch.zeros(1, device=self.device), group=group)
            self._warm.add(id(group))

    def batch(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """``dist.batch_isend_irecv``; gloo's send works wrapped so their completion shows."""
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops) or dist.get_backend(ops[0].group) != "gloo":
            return works
        return [self._waited(w) if op.op is dist.isend else w
                for op, w in zip(ops, works, strict=True)]

    def _waited(self, work: dist.Work) -> dist.Work:
        if self._sends is None:
            self._sends = queue.SimpleQueue()
            threading.Thread(target=self._wait_sends, args=(self._sends,), daemon=True,
                             name="gloo-send-waiter").start()
        waited = _WaitedWork(work)
        self._sends.put(waited)
        return waited  # type: ignore[return-value]

    def _wait_sends(self, sends: queue.SimpleQueue[_WaitedWork]) -> None:
        # the only waiter of these works: a gloo work must not be waited on twice
        while True:
            waited = sends.get()
            try:
                waited.work.wait(self.timeout)
            except RuntimeError as err:
                waited.finish(f"{err}".splitlines()[0])
            else:
                waited.finish(None)


class _WaitedWork:
    """A gloo send work waited on by the transport's thread; done once it returned."""

    def __init__(self, work: dist.Work) -> None:
        self.work = work
        self._done = threading.Event()
        self._error: str | None = None

    def finish(self, error: str | None) -> None:
        """Record that the wait returned (with the error, if it raised)."""
        self._error = error
        self._done.set()

    def is_completed(self) -> bool:
        """True once the send was delivered (or failed)."""
        return self._done.is_set()

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Block until delivered (False on timeout); raise if the send failed."""
        if not self._done.wait(None if timeout is None else timeout.total_seconds()):
            return False
        if self._error is not None:
            raise RuntimeError(self._error)
        return True


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
