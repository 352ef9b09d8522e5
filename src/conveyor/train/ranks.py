"""What every launching command (train, finetune, eval, predict) shares about its ranks:
how many threads each gets, which device it runs on, and how a rank's user error
reaches the parent as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ConfigError
from ..data import DataError
from ..threads import available_cores
from .checkpoint import CheckpointError

__all__ = ["rank_device", "threads_per_rank", "user_errors_of_ranks"]


def threads_per_rank(world: int) -> int:
    """This machine's cores shared out over ``world`` ranks (at least one each)."""
    return max(1, available_cores() // world)  # more threads than cores slows every rank down


def rank_device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def user_errors_of_ranks() -> Iterator[None]:
    """Re-raise a rank's user error (a bad checkpoint, a full disk) here as itself, one line."""
    try:
        yield
    except mp.ProcessRaisedException as err:
        lines = str(err).strip().splitlines()
        last = lines[-1] if lines else ""
        for cls in (CheckpointError, DataError, ConfigError):
            prefix = f"{cls.__module__}.{cls.__qualname__}: "
            if last.startswith(prefix):
                raise cls(f"rank {err.error_index}: {last[len(prefix):]}") from None
        raise
