"""Profile layouts with every rank in its own local process, all at once, as the runtime runs.

:func:`~conveyor.sim.profile.profile_costs` replays one pipeline rank after another in
the calling process: its compute never shares the machine with the other ranks, and
a tensor-parallel stage cannot run there at all. Here the layout's ``pp x dp x tp``
ranks are started together (one thread each); each replays its pipeline rank's
compute actions in schedule order (:func:`~conveyor.sim.profile.replay_rank`), tp
ranks on their shards of the blocks with the real collectives inside forward and
backward (so a narrower GEMM costs what it costs, and a collective what it costs in
its place), dp replicas side by side. A barrier starts each replayed step on every
rank. Ranks sharing cores and memory slow each other down, but a pipeline's ranks
are not always busy together (with one microbatch they take turns): so a pipeline
without tp is also replayed one rank at a time, and the planner weighs the two by
how much the other ranks compute meanwhile (``plan.estimate``). What stays
modelled: the pipeline's messages and the executor (the runtime's measured
constants), the dp gradient reduction and the once-per-step reductions
(:mod:`conveyor.sim.gloo`'s fits).

Several layouts of one world size are profiled in one launch (the process start and
``import torch`` cost seconds), round-robin (:class:`GroupReplay`), as many at once as
fit a share of the host's memory. ``sim`` does not import the runtime: the caller
hands it in (:class:`~conveyor.sim.profile.Runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conveyor.config import ModelConfig
from conveyor.models import block_param_counts, build_blocks
from conveyor.parallel.layout import Layout
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.tp_blocks import build_tp_blocks

from .analytic import host_memory
from .profile import RankProfile, RankReplay, Runtime, StageFactory

__all__ = ["GroupReplay", "Job", "RankTimes", "profile_jobs"]


@dataclass(frozen=True)
class Job:
    """One layout to profile: the runtime's layout, its microbatch and recompute mode."""

    layout: Layout
    microbatch_size: int
    seq_len: int
    recompute: bool | str = False

    @property
    def world(self) -> int:
        """Ranks the layout runs on."""
        return self.layout.pp * self.layout.dp * self.layout.tp


@dataclass
class RankTimes:
    """One rank's profiles of one job: replayed with every rank at once, and alone."""

    together: RankProfile
    alone: RankProfile | None = None
    """Replayed while the other ranks waited (pipelines without tp only); None: not taken."""


class GroupReplay:
    """One rank's replays of every job, stepped round-robin (run in every rank at once).

    :meth:`round` replays each job's step once with all ranks at once, then, for
    pipelines without tp, once more on each rank alone while the others wait; so load
    coming and going on the machine hits every job and both kinds alike. Callers may
    interleave rounds with other work (``benchmarks/plan_accuracy.py`` measures the
    real steps in between).
    """

    def __init__(self, cfg: ModelConfig, jobs: list[Job], seed: int = 0, *,
                 runner: StageFactory) -> None:
        torch.set_num_threads(1)
        meshes: dict[tuple[int, int, int], Mesh] = {}
        self.replays: list[tuple[Mesh, RankReplay]] = []
        for job in jobs:
            lay = job.layout
            key = (lay.pp, lay.dp, lay.tp)
            if key not in meshes:
                meshes[key] = Mesh.build(*key)
            mesh = meshes[key]
            group = mesh.tp_group if lay.tp > 1 else None

            def build(c: ModelConfig, s: int, idx: list[int], group: Any = group,
                      sp: bool = lay.sequence_parallel) -> list[nn.Module]:
                if group is None:
                    return build_blocks(c, s, idx)
                return build_tp_blocks(c, s, idx, group, sequence_parallel=sp)

            self.replays.append((mesh, RankReplay(
                cfg, lay, mesh.pp_rank, microbatch_size=job.microbatch_size,
                seq_len=job.seq_len, seed=seed, recompute=job.recompute, runner=runner,
                build=build)))
        self.together = [r.profile for _, r in self.replays]
        # a pipeline's ranks also idle (they take turns at m = 1): time each rank alone too
        self.alone = {i: RankProfile(param_bytes=r.profile.param_bytes)
                      for i, (job, (_, r)) in enumerate(zip(jobs, self.replays, strict=True))
                      if job.layout.pp > 1 and job.layout.tp == 1}

    def round(self, record: bool = True) -> None:
        """Every job's step once with all ranks at once, then the pipelines' ranks alone."""
        for (_, replay), prof in zip(self.replays, self.together, strict=True):
            dist.barrier()
            replay.profile = prof
            replay.step(record)
        for k in range(dist.get_world_size()):
            for i, prof in self.alone.items():
                if dist.get_rank() == k:
                    replay = self.replays[i][1]
                    replay.profile = prof
                    replay.step(record)
            dist.barrier()

    def finish(self) -> list[tuple[tuple[int, int, int], RankTimes]]:
        """Per job: this rank's (pp, dp, tp) index and its times (kinds never run timed alone)."""
        out = []
        for i, (mesh, replay) in enumerate(self.replays):
            replay.profile = self.together[i]
            times = RankTimes(replay.finish())
            if i in self.alone:
                replay.profile = self.alone[i]
                times.alone = replay.finish(isolated_repeats=1)
            out.append(((mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), times))
        return out


def _replay_all(cfg: ModelConfig, jobs: list[Job], seed: int, warmup: int, repeats: int,
                runner: StageFactory) -> list[tuple[tuple[int, int, int], RankTimes]]:
    """In each rank: ``warmup + repeats`` rounds of every job; ((pp, dp, tp), times) per job."""
    group = GroupReplay(cfg, jobs, seed, runner=runner)
    for step in range(warmup + repeats):
        group.round(record=step >= warmup)
    return group.finish()


def profile_jobs(cfg: ModelConfig, jobs: list[Job], *, runtime: Runtime, seed: int = 0,
                 warmup: int = 1, repeats: int = 3, timeout_s: float = 600.0
                 ) -> list[dict[tuple[int, int, int], RankTimes]]:
    """Profile every job (one world size) on local gloo ranks; per job, times by rank index."""
    if not jobs:
        return []
    worlds = {j.world for j in jobs}
    if len(worlds) != 1:
        raise ValueError(f"jobs need {sorted(worlds)} ranks; profile one world size at a time")
    world = worlds.pop()
    out: list[dict[tuple[int, int, int], RankTimes]] = []
    for batch in _batches(cfg, jobs, world):
        got = runtime.launch(_replay_all, world, cfg, batch, seed, warmup, repeats,
                             runtime.stage_runner, backend="gloo", timeout_s=timeout_s)
        out += [{got[r][i][0]: got[r][i][1] for r in got} for i in range(len(batch))]
    return out


def _batches(cfg: ModelConfig, jobs: list[Job], world: int) -> list[list[Job]]:
    """Consecutive runs of jobs whose replays (all held at once, round-robin) fit a share
    of the host's memory: weights and grads of a rank's blocks, twice over for slack."""
    budget = host_memory() / (2 * world)
    each = 4 * 4 * sum(block_param_counts(cfg))  # fp32 weights + grads, x2
    out: list[list[Job]] = [[]]
    used = 0.0
    for job in jobs:
        need = each / (job.layout.pp * job.layout.tp)
        if out[-1] and used + need > budget:
            out.append([])
            used = 0.0
        out[-1].append(job)
        used += need
    return out
