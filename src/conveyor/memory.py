"""Counting activation memory: the bytes autograd saves for backward.

Shared by the runtime (measured peak per rank) and the profiler (predicted bytes
per stage), so that prediction and measurement count the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["ActivationMeter", "SavedBytes", "count_saved_bytes", "weight_storages"]


class SavedBytes:
    """Bytes of distinct storages saved for backward inside a ``count_saved_bytes`` block."""

    def __init__(self, exclude: set[int]) -> None:
        self._exclude = exclude
        self._seen: dict[int, int] = {}

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude:
            # views (q, k, v split from one projection) share a storage: count it once
            self._seen[ptr] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        """Bytes counted so far."""
        return sum(self._seen.values())


def weight_storages(modules: Iterable[nn.Module]) -> set[int]:
    """Storages of the parameters and buffers of ``modules``: what is not an activation."""
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


@contextmanager
def count_saved_bytes(modules: Iterable[nn.Module] | set[int]) -> Iterator[SavedBytes]:
    """Count what autograd saves while the block runs, weights and buffers excluded.

    ``modules`` may be the modules, or their :func:`weight_storages` computed once.
    """
    exclude = modules if isinstance(modules, set) else weight_storages(modules)
    counter = SavedBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter._pack, lambda t: t):
        yield counter


class ActivationMeter:
    """Activation and in-flight boundary bytes alive on one rank, and the most at once.

    Bytes are counted by kind (``stash``: what forwards saved for backward; ``send``:
    boundary tensors posted and not yet delivered) and in total, each with its peak.
    Stashes are also counted in stage-microbatch units, the unit of
    ``schedules.validate.peak_activations``, so the two can be compared directly.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.live_by: dict[str, int] = {}
        self.peak_by: dict[str, int] = {}
        self.units = 0
        self.peak_units = 0

    def add(self, nbytes: int, kind: str = "stash") -> None:
        """``nbytes`` of ``kind`` became alive (a forward stashed them, a send was posted)."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        live = self.live_by[kind] = self.live_by.get(kind, 0) + nbytes
        self.peak_by[kind] = max(self.peak_by.get(kind, 0), live)
        if kind == "stash":
            self.units += 1
            self.peak_units = max(self.peak_units, self.units)

    def release(self, nbytes: int, kind: str = "stash") -> None:
        """``nbytes`` of ``kind`` went (a backward or weight-grad ran, a send completed)."""
        self.live -= nbytes
        self.live_by[kind] = self.live_by.get(kind, 0) - nbytes
        if kind == "stash":
            self.units -= 1

    def reset(self) -> None:
        """Nothing is alive any more (a failed step was cleared); the peaks stay."""
        self.live = self.units = 0
        self.live_by = dict.fromkeys(self.live_by, 0)
