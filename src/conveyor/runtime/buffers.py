"""Receive buffers kept across steps: static shapes make every step ask for the same ones.

A received activation lives on as the stage's input until its backward ends (longer
under split backward), a received grad until the backward that consumes it, so
buffers cannot be recycled at fixed points of the schedule. Instead each buffer is
handed out as a fresh alias of pooled storage and is handed out again once nothing
else holds that storage (no alias, no view, no autograd graph): the pool grows to the
most receives of one shape in flight at once, and after the first step no receive
allocates. Where torch offers no storage use count, every receive allocates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RecvBuffers"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class RecvBuffers:
    """A pool of receive buffers by shape, dtype and device."""

    def __init__(self) -> None:
        # key -> [(buffer, its storage handle)]; both count as one use each
        self._pool: dict[tuple, list[tuple[Tensor, torch.UntypedStorage]]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of this shape whose storage nobody else uses."""
        if _use_count is None:
            return torch.empty(shape, dtype=dtype, device=device)
        entries = self._pool.setdefault((tuple(shape), dtype, device), [])
        for buf, storage in entries:
            if _use_count(storage._cdata) == 2:  # only the pool's own two references
                return buf.detach()
        buf = torch.empty(shape, dtype=dtype, device=device)
        entries.append((buf, buf.untyped_storage()))
        return buf.detach()

    def __len__(self) -> int:
        return sum(len(v) for v in self._pool.values())

    def clear(self) -> None:
        """Drop every pooled buffer (a failed step may leave receives writing into them)."""
        self._pool.clear()
