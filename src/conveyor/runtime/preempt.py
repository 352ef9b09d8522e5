"""SIGTERM / SIGINT as a request to stop at the next step boundary; a second signal aborts.

A rank that gets the signal only notes it. At each step boundary the ranks agree
(one all-reduce of the signal number, MAX) so that all of them stop after the same
step, save a checkpoint together and return. The launching process forwards the
signals it receives to its ranks (see ``launch``), so SIGTERM to the parent of a
local run, to torchrun, or Ctrl-C in a terminal all take this path.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from ..log import get_logger

__all__ = ["STOP_SIGNALS", "StopRequest"]

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Installs handlers for STOP_SIGNALS in this process; ``agreed()`` is the collective check."""

    def __init__(self) -> None:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:  # the second signal: no checkpoint, leave now
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint; signal again to "
                    "abort without one", signal.Signals(signum).name)

    def agreed(self, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
        """The signal some rank got (0: none), the same on every rank of ``group``; collective."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())
