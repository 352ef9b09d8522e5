"""NCCL's point-to-point rules, imposed on gloo: the CPU test of the GPU code path.

Gloo is forgiving where NCCL is not. This transport takes away what NCCL does not
give, and only that, so a protocol that passes here does not rely on gloo:

- **One work per batch.** ``batch`` returns a single work covering every op, as
  ``batch_isend_irecv`` does on a backend that coalesces.
- **Ordered matching, no tags.** All payloads of a group travel under one gloo tag,
  so the k-th send from A to B meets B's k-th receive from A, whatever tags the
  caller chose. The caller's tags travel beside the payload only so that a mismatch
  is reported ("send tagged 9 met a receive tagged 5") instead of silently
  delivering the wrong tensor, which is what NCCL would do.
- **Rendezvous sends.** A send completes only once the peer has posted the
  matching receive: the receiver acknowledges when its receive starts.
- **One stream per group.** A rank's batches on one group run strictly one after
  another, like kernels on a communicator's stream: a send queued behind a receive
  waits for that receive to finish.
- **Collective first use.** A group must be warmed up by a collective of all its
  ranks before its first batch.
"""

from __future__ import annotations

import datetime
import queue
import threading

import torch
import torch.distributed as dist

__all__ = ["NcclSemantics"]

# gloo tags of the emulation's own messages; the caller's tags are never used to match
_PAYLOAD, _HEADER, _ACK = 0, 1, 2


class _BatchWork:
    """The one work of a batch: done when every op of the batch is done."""

    def __init__(self, ops: list[dist.P2POp]) -> None:
        self.ops = ops
        self._done = threading.Event()
        self.error: str | None = None

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Block until the batch is done (False on timeout); raise if it failed."""
        if not self._done.wait(None if timeout is None else timeout.total_seconds()):
            return False
        if self.error is not None:
            raise RuntimeError(self.error)
        return True

    def is_completed(self) -> bool:
        """True once the batch has finished (or failed)."""
        return self._done.is_set()

    def finish(self, error: str | None = None) -> None:
        """Mark the batch done, with the reason if it failed."""
        self.error = error
        self._done.set()


class _Stream:
    """One group's queue of batches on this rank, run in order by a thread of its own."""

    def __init__(self, group: dist.ProcessGroup, timeout: datetime.timedelta) -> None:
        self.group = group
        self.timeout = timeout
        self._queue: queue.SimpleQueue[_BatchWork] = queue.SimpleQueue()
        self._failed: str | None = None
        threading.Thread(target=self._loop, daemon=True, name="nccl-semantics").start()

    def submit(self, work: _BatchWork) -> None:
        """Queue ``work`` behind every batch submitted before it."""
        self._queue.put(work)

    def _loop(self) -> None:
        while True:
            work = self._queue.get()
            if self._failed is not None:  # a broken stream runs nothing more, like NCCL's
                work.finish(f"an earlier batch on this group failed: {self._failed}")
                continue
            try:
                self._run(work)
            except Exception as err:  # noqa: BLE001 - reported through the work
                self._failed = f"{type(err).__name__}: {err}".splitlines()[0]
                work.finish(self._failed)
            else:
                work.finish()

    def _run(self, work: _BatchWork) -> None:
        g = self.group
        pending: list[dist.Work] = []
        checks: list[tuple[dist.P2POp, torch.Tensor, str]] = []
        for op in work.ops:
            mine = torch.tensor([op.tag], dtype=torch.int64)
            theirs = torch.empty(1, dtype=torch.int64)
            if op.op is dist.isend:
                pending += [
                    dist.isend(mine, op.peer, group=g, tag=_HEADER),
                    dist.isend(op.tensor, op.peer, group=g, tag=_PAYLOAD),
                    dist.irecv(theirs, op.peer, group=g, tag=_ACK),  # the rendezvous
                ]
                checks.append((op, theirs, "send"))
            else:
                pending += [
                    dist.irecv(theirs, op.peer, group=g, tag=_HEADER),
                    dist.irecv(op.tensor, op.peer, group=g, tag=_PAYLOAD),
                    dist.isend(mine, op.peer, group=g, tag=_ACK),
                ]
                checks.append((op, theirs, "receive"))
        for w in pending:
            w.wait(self.timeout)
        for op, theirs, what in checks:
            if int(theirs) != op.tag:
                other = "receive" if what == "send" else "send"
                raise RuntimeError(
                    f"ordered matching paired this {what} (tag {op.tag}, peer {op.peer}) with "
                    f"a {other} tagged {int(theirs)}: both sides must issue the messages of a "
                    "group in the same order"
                )


class NcclSemantics:
    """A transport over gloo with NCCL's rules (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._streams: dict[int, _Stream] = {}
        self._warm: set[int] = set()

    def warm_up(self, group: dist.ProcessGroup) -> None:
        """All-reduce one element over ``group``: its collective first use."""
        if id(group) not in self._warm:
            dist.all_reduce(torch.zeros(1), group=group)
            self._warm.add(id(group))

    def batch(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """Queue ``ops`` on their group's stream; one work for them all."""
        group = ops[0].group
        if any(op.group is not group for op in ops):
            raise ValueError("all ops of a batch must use the same process group")
        if group is None or id(group) not in self._warm:
            raise RuntimeError(
                "the first use of a process group is a batched p2p call, which NCCL leaves "
                "undefined unless every rank of the group joins it; warm the group up with a "
                "collective first"
            )
        if dist.get_backend(group) != "gloo":
            raise RuntimeError("NCCL semantics are emulated over gloo only; use the CPU backend")
        stream = self._streams.get(id(group))
        if stream is None:
            stream = self._streams[id(group)] = _Stream(group, self.timeout)
        work = _BatchWork(ops)
        stream.submit(work)
        return [work]  # type: ignore[list-item]
