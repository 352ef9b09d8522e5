"""Intra-op threads for a block of work, then back to what they were."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["intra_op_threads"]


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then restore the previous count."""
    own = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(own)
