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
    """Activation bytes alive on one rank now, and the most at once (across its stages)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        """A forward stashed ``nbytes`` for its backward."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def release(self, nbytes: int) -> None:
        """A backward (or weight-grad) let ``nbytes`` go."""
        self.live -= nbytes
