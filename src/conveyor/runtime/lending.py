"""Idle cores lent to the rank that can use them, on CPU.

Each rank of a local CPU run computes on its own share of the cores (one thread on a
2-core machine with 2 ranks). During a pipeline's warm-up and cool-down some ranks
can only wait: rank 0's first forward runs before any other rank has work, the last
backwards after the others are done. ``schedules.concurrency.core_shares`` finds
these actions from the schedule alone (no costs, no timing), together with how many
ranks' cores each may take without ever oversubscribing the machine; here each such
action runs with that many times the rank's threads.

Lending needs every rank of the job on this host (an idle rank on another host frees
no core here) and a machine not already oversubscribed. It is not used on GPUs,
whose work does not run on these threads.
"""

from __future__ import annotations

import os

import torch

from ..schedules.concurrency import core_shares
from ..schedules.ir import Action, Schedule
from ..threads import available_cores
from .launch import under_torchrun

__all__ = ["cannot_lend", "lent_threads", "single_host"]


def single_host() -> bool:
    """True when every rank of the job runs on this machine (as torchrun, or ``launch``, says)."""
    if not under_torchrun():
        return True  # a process group made by hand in one process, or none
    return os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]


def cannot_lend(device: torch.device, world_size: int, *, compiled: bool = False) -> str | None:
    """Why idle ranks' cores cannot be lent in this job, or None when they can."""
    if device.type != "cpu":
        return f"ranks compute on {device.type}, not on CPU threads"
    if compiled:  # a lent first forward would leave every later one on the lent threads
        return "--compile builds each CPU kernel for the thread count it first runs with"
    if not single_host():
        return "some ranks run on other machines (LOCAL_WORLD_SIZE != WORLD_SIZE)"
    threads, cores = torch.get_num_threads(), available_cores()
    if world_size * threads > cores:
        return (f"{world_size} ranks x {threads} threads already take more than this "
                f"machine's {cores} cores")
    return None


def lent_threads(schedule: Schedule, rank: int, device: torch.device, world_size: int, *,
                 compiled: bool = False) -> dict[Action, int]:
    """This rank's compute actions that run on more threads than its own, and how many."""
    if cannot_lend(device, world_size, compiled=compiled) is not None:
        return {}
    base = torch.get_num_threads()
    return {a: base * share for a, share in core_shares(schedule).get(rank, {}).items()}
