"""Fault injection for the fault tests: kill a chosen rank at a named point of its run.

``CONVEYOR_FAULT=POINT:RANK:N`` makes rank RANK SIGKILL itself the N-th time it
passes ``fault_point(POINT)``; ``POINT:RANK:N:FILE`` only while FILE does not exist
(it is created first), so a restarted run (torchrun --max-restarts) is not killed again.
A ``stall/`` prefix (``stall/save.shard:1:1``) makes the rank hang there instead. Points: ``start`` (a spawned rank, before the
process group forms), ``step`` (after a training step),
``save.shard`` (a checkpoint shard written, the save not yet agreed) and
``save.publish`` (rank 0: meta.json written, the directory not yet renamed).
Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "CONVEYOR_FAULT"

_passes: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process here if CONVEYOR_FAULT names this point, rank and pass."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    stall = spec.startswith("stall/")
    point, rank, nth, *once = spec.removeprefix("stall/").split(":", 3)
    if point != name or os.environ.get("RANK", "0") != rank:
        return
    _passes[name] += 1
    if _passes[name] != int(nth):
        return
    if once:
        if os.path.exists(once[0]):
            return
        open(once[0], "w").close()
    if stall:
        time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
