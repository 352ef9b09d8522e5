"""The search: every layout of a model on a cluster that fits, ranked by predicted step time.

How the space is pruned, so that 1,000 GPUs take seconds:

1. Shapes that cannot run are never built: tp divides the heads, key/value heads
   and MLP width (and the sequence under SP) and stays inside a node (tp across
   nodes puts 4 collectives per layer on the slow link); pp * v stages have a block
   each; dp divides the GPUs left and the global batch; microbatch sizes are
   powers of two dividing the per-replica batch.
2. Dominated choices are dropped: gpipe (1F1B has its bubble and less memory),
   partitions other than ``cost`` (it minimises the costliest stage, which the
   step time follows), interleaving deeper than 4 chunks.
3. Recompute and ZeRO-1 only buy memory at a price in time, so for each remaining
   point they are tried cheapest first (none, selective, full; ZeRO off, on) and
   the first that fits is kept.
4. Survivors are ranked by the closed forms of :mod:`.estimate`; then, best first,
   they are simulated exactly (when small enough) until the best simulated step is
   no slower than the next closed form, at most ``finalists`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from conveyor.config import ConfigError, ModelConfig
from conveyor.parallel.tp_blocks import check_tensor_parallel
from conveyor.sim import CostModel
from conveyor.sim.profile import Runtime

from .cluster import Cluster
from .estimate import Candidate, Estimate, estimate, profiled_costs, simulate_candidate

__all__ = ["Plan", "plan", "SCHEDULES", "candidates"]

SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v")
"""Schedules the planner weighs (gpipe is dominated by 1f1b)."""

_MAX_SIMULATED_ACTIONS = 8_000
"""Finalists with more compute actions than this keep their closed-form estimate."""


@dataclass(frozen=True)
class Plan:
    """The ranked layouts and how many points the search weighed."""

    ranked: tuple[Estimate, ...]
    searched: int
    """Candidate points estimated (after the shape and dominance pruning)."""
    model: ModelConfig
    cluster: Cluster
    global_batch: int
    seq_len: int
    dp_bucket_mb: float

    @property
    def best(self) -> Estimate:
        """The first choice."""
        return self.ranked[0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(model: ModelConfig, tp: int, sp: bool, seq_len: int) -> bool:
    try:
        check_tensor_parallel(model, tp, sequence_parallel=sp, seq_len=seq_len)
    except ConfigError:
        return False
    return True


def candidates(model: ModelConfig, cluster: Cluster, global_batch: int, seq_len: int, *,
               schedules: tuple[str, ...] = SCHEDULES) -> Iterator[Candidate]:
    """Every shape-valid, undominated point (recompute and ZeRO left at their cheapest)."""
    n = cluster.gpus
    for tp in _divisors(n):
        if tp > cluster.gpus_per_node or not _tp_ok(model, tp, False, seq_len):
            continue
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if pp > model.num_blocks or global_batch % dp:
                continue
            per_replica = global_batch // dp
            sizes = [b for b in (1, 2, 4, 8, 16, 32) if per_replica % b == 0]
            for b in sizes:
                m = per_replica // b
                for name, v in _schedules(pp, m, model.num_blocks, schedules):
                    for sp in (False, True) if tp > 1 else (False,):
                        if sp and not _tp_ok(model, tp, True, seq_len):
                            continue
                        yield Candidate(tp=tp, pp=pp, dp=dp, schedule=name, virtual_stages=v,
                                        microbatch_size=b, microbatches=m, sequence_parallel=sp)


def _schedules(pp: int, m: int, blocks: int, names: tuple[str, ...]
               ) -> Iterator[tuple[str, int]]:
    if pp == 1:  # one stage: every schedule is the same loop
        yield ("1f1b", 1)
        return
    for name in names:
        if name == "interleaved-1f1b":
            for v in (2, 4):
                if pp * v <= blocks:
                    yield (name, v)
        elif name == "zb-v":
            if 2 * pp <= blocks:
                yield (name, 2)
        else:
            yield (name, 1)


def plan(model: ModelConfig, cluster: Cluster, *, global_batch: int, seq_len: int,
         memory_limit: float | None = None, dp_bucket_mb: float = 25.0, finalists: int = 16,
         schedules: tuple[str, ...] = SCHEDULES,
         where: Callable[[Candidate], bool] | None = None,
         profile: Runtime | None = None) -> Plan:
    """Search, prune and rank; raise ConfigError if nothing fits in memory.

    ``where`` keeps only the candidates it accepts (e.g. one (tp, pp) split);
    ``profile`` (cpu) times the finalists' compute on this machine with this runtime
    (``conveyor.runtime.profiling``).
    """
    if profile and cluster.device.name != "cpu":
        raise ConfigError("--profile times this machine; use it with --device cpu")
    if not 1 <= seq_len <= model.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} must be in 1..max_seq_len={model.max_seq_len}")
    if global_batch < 1:
        raise ConfigError(f"--batch {global_batch} must be a positive number of sequences")
    limit = cluster.device.memory_bytes if memory_limit is None else memory_limit
    fits: list[Estimate] = []
    searched = 0
    for c in candidates(model, cluster, global_batch, seq_len, schedules=schedules):
        if where is not None and not where(c):
            continue
        for rc in ("none", "selective", "full"):
            chosen = None
            for zero in (0, 1) if c.dp > 1 else (0,):
                searched += 1
                e = estimate(model, replace(c, recompute=rc, zero=zero), cluster, seq_len,
                             global_batch, dp_bucket_mb)
                if e.peak_memory_bytes <= limit:
                    chosen = e
                    break
            if chosen is not None:
                fits.append(chosen)
                break
    if not fits:
        raise ConfigError(
            f"no layout of this model fits {limit / 2**30:.1f} GiB per device on "
            f"{cluster.gpus} devices (searched {searched}); use more devices, a smaller "
            "global batch or sequence, or a device with more memory")
    fits.sort(key=lambda e: e.step_s)
    # simulate in closed-form order until the best simulated step is no slower than the
    # next closed form (which, idealising the pipeline, is optimistic), or ``finalists``
    # (profiled times are not comparable with closed forms: then the first ``finalists``
    # are all simulated and ranked ahead of the rest)
    def small(c: Candidate) -> bool:
        return c.pp * c.virtual_stages * c.microbatches * 3 <= _MAX_SIMULATED_ACTIONS

    timed: dict[Candidate, CostModel] = {}
    if profile:  # every finalist's compute timed here, in one launch
        picked = [e.candidate for e in fits[:finalists] if small(e.candidate)]
        timed = dict(zip(picked, profiled_costs(model, picked, cluster, seq_len, global_batch,
                                                dp_bucket_mb, runtime=profile), strict=True))
    ranked: list[Estimate] = []
    best = math.inf
    for i, e in enumerate(fits):
        c = e.candidate
        if i >= finalists or (e.step_s >= best and not profile):
            ranked.append(e)
            continue
        if not small(c):
            ranked.append(e)
            best = min(best, e.step_s)
            continue
        sim = simulate_candidate(model, c, cluster, seq_len, global_batch, dp_bucket_mb,
                                 cost=timed.get(c))
        if sim.peak_memory_bytes <= limit:  # the exact walk may hold more than the bound
            ranked.append(sim)
            best = min(best, sim.step_s)
    ranked.sort(key=lambda e: (profile and not e.simulated, e.step_s))
    return Plan(tuple(ranked), searched, model, cluster, global_batch, seq_len, dp_bucket_mb)

