"""The step ``conveyor train --trace`` records: every rank's timeline gathered to rank 0,
which writes it as timeline.json (``conveyor trace`` reads it) and as a Chrome trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..runtime.pipeline import Pipeline
from ..sim.render import write_chrome_trace
from ..sim.timeline_io import save_timeline
from .rundir import TIMELINE_FILE, TRACE_FILE

__all__ = ["save_step_trace"]


def save_step_trace(pipe: Pipeline, run_dir: Path, step: int) -> None:
    """Gather the recorded ``step`` of every rank; rank 0 writes it (first dp replica's pipeline)."""
    mesh = pipe.mesh
    # tp ranks of a stage run the same actions: the first one's stand for them
    first = mesh.dp_rank == 0 and mesh.tp_rank == 0
    mine = (first, mesh.pp_rank, pipe.executor.timeline)
    rank0 = dist.get_rank() == 0
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(mine, gathered, dst=0)
    pipe.executor.record = False
    if gathered is None:
        return
    timeline = {pp: acts for first, pp, acts in gathered if first}
    meta = {"step": step, "schedule": pipe.schedule.name}
    save_timeline(timeline, run_dir / TIMELINE_FILE, meta)
    write_chrome_trace({f"measured step {step}": timeline}, run_dir / TRACE_FILE)
