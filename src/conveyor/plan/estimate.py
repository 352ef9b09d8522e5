"""One candidate layout and its predicted step: closed form for the search, simulated for finalists.

Per-stage seconds and bytes come from :func:`conveyor.sim.analytic_costs` (FLOPs,
element-wise memory traffic, tp collectives, the dp reduction; activation bytes by
tp, sequence parallelism and recompute mode). The closed forms below give a
schedule's makespan from them without building the schedule, with per-rank work
per microbatch ``R`` (F + B + W of the rank's chunks; the busiest rank's) and the
first stage's forward ``f``:

- 1f1b (and gpipe): ``(m + p - 1) R`` (the last microbatch's path through p ranks);
- interleaved-1f1b with v chunks: ``(m + (p - 1) / v) R``;
- zb-h1 and zb-h2: ``m R + (p - 1)(F + I - W)``; zb-v: ``m R + (p - 1) f`` (``f`` = a
  chunk's F);

each the validator's makespan for uniform stages once m >= p (zb-v: 2m >= 3p - 1;
``schedules.zero_bubble``), each plus ``2 (p - 1)`` point-to-point transfers on the
critical path. Peak held
activations per rank, in stage-microbatches, are those the schedules' docstrings
derive, for rank r: 1F1B ``min(p - r, m)`` stages, ZB-H1 ``min(p, m)``, ZB-H2
``min(m, p + min(p - 1 - r, x) + min(r, x))`` with ``x = min(p - 1, max(0, m - p))``, ZB-V
``min(2p, 2m, m + 1 + r)`` chunks, interleaved (Megatron's warm-up)
``min(2 (p - r - 1) + (v - 1) p + 1, m v)`` chunks, each the size of the rank's
average stage. Finalists are simulated exactly (:func:`conveyor.sim.simulate`), which
also walks memory exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.parallel.layout import (
    Layout,
    analytic_block_costs,
    resolve_layout,
    resolve_partition,
)
from conveyor.parallel.partition import Partition
from conveyor.schedules.validate import TimedAction
from conveyor.sim import CostModel, analytic_costs, simulate
from conveyor.sim.activations import recompute_mode
from conveyor.sim.analytic import gloo_runtime_costs
from conveyor.sim.comm import Collective, MeshLinks, collective_time
from conveyor.sim.group_profile import Job, RankTimes, profile_jobs
from conveyor.sim.profile import Runtime, costs_from_profiles

from .cluster import Cluster

__all__ = ["Candidate", "Estimate", "costs_from_times", "estimate", "model_flops",
           "profile_jobs_of", "profiled_costs",
           "simulate_candidate"]


@dataclass(frozen=True)
class Candidate:
    """A point of the search space: everything ``[parallel]`` and the batch split hold."""

    tp: int
    pp: int
    dp: int
    schedule: str
    virtual_stages: int
    microbatch_size: int
    microbatches: int
    recompute: str = "none"
    sequence_parallel: bool = False
    zero: int = 0
    partition: str = "cost"

    def parallel_config(self, dp_bucket_mb: float = 25.0) -> ParallelConfig:
        """The ``[parallel]`` section that trains this layout."""
        rc = {"none": False, "full": True}.get(self.recompute, self.recompute)
        return ParallelConfig(
            pp=self.pp, dp=self.dp, tp=self.tp, sequence_parallel=self.sequence_parallel,
            schedule=self.schedule, microbatches=self.microbatches,
            virtual_stages=None if self.virtual_stages == 1 else self.virtual_stages,
            recompute=rc, partition=self.partition, dp_bucket_mb=dp_bucket_mb, zero=self.zero)

    def label(self) -> str:
        """Short text: ``dp8 pp4 tp8 interleaved-1f1b(v2) b1xm16 rc=full sp zero1``."""
        v = f"(v{self.virtual_stages})" if self.schedule == "interleaved-1f1b" else ""
        extra = " sp" * self.sequence_parallel + " zero1" * (self.zero == 1)
        return (f"dp{self.dp} pp{self.pp} tp{self.tp} {self.schedule}{v} "
                f"b{self.microbatch_size}xm{self.microbatches} rc={self.recompute}{extra}")


@dataclass(frozen=True)
class Estimate:
    """What the planner predicts for one candidate (seconds, bytes, shares)."""

    candidate: Candidate
    step_s: float
    compute_s: float
    """Busiest rank's work per step (every microbatch's F, B, W, collectives inside)."""
    bubble: float
    """Share of the step the busiest rank is idle inside the pipeline."""
    tp_s: float
    """Busiest rank's seconds in tensor-parallel collectives."""
    dp_exposed_s: float
    """Seconds the data-parallel reduction adds after the pipeline."""
    peak_memory_bytes: int
    peak_activation_bytes: int
    tokens_per_s: float
    mfu: float
    simulated: bool = False

    @property
    def comm_share(self) -> float:
        """Exposed communication share of the step: tp collectives and the dp tail."""
        return (self.tp_s + self.dp_exposed_s) / self.step_s


@functools.lru_cache(maxsize=4096)
def _partition(model: ModelConfig, stages: int, seq_len: int, how: str) -> Partition:
    return resolve_partition(model, stages, how, analytic_block_costs(model, seq_len))


def model_flops(model: ModelConfig, seq_len: int, sequences: int) -> float:
    """Model FLOPs of one training step (forward x 3, no recompute, causal attention)."""
    return 3.0 * sequences * sum(analytic_block_costs(model, seq_len))


def costs(model: ModelConfig, c: Candidate, cluster: Cluster, seq_len: int,
          dp_bucket_mb: float = 25.0) -> CostModel:
    """The per-stage cost model of candidate ``c``."""
    part = _partition(model, c.pp * c.virtual_stages, seq_len, c.partition)
    cost = analytic_costs(
        model, part, microbatch_size=c.microbatch_size, seq_len=seq_len, device=cluster.device,
        tp=c.tp, dp=c.dp, sequence_parallel=c.sequence_parallel,
        recompute=recompute_mode(c.recompute), dp_bucket_mb=dp_bucket_mb, zero=c.zero)
    if cluster.device.name == "cpu":  # the CPU runtime's executor and gloo, as measured
        cost = replace(cost, **gloo_runtime_costs(cost.message_bytes))
    return replace(cost, step_end_s=step_end_seconds(model, c, cluster))


def step_end_seconds(model: ModelConfig, c: Candidate, cluster: Cluster) -> float:
    """What the runtime reduces once per step after the pipeline: the tied embedding's
    grad across the two pipeline ranks holding copies (fp32, this tp rank's vocabulary
    rows), and the loss over pp and over dp (one fp32 scalar each)."""
    dev = cluster.device
    links = MeshLinks.build(tp=c.tp, dp=c.dp, pp=c.pp, gpus_per_node=dev.gpus_per_node,
                            intra=dev.intra, inter=dev.inter)
    scalar = Collective("all-reduce", 4.0)
    seconds = collective_time(scalar, c.pp, links.pp) + collective_time(scalar, c.dp, links.dp)
    if model.tie_embeddings and c.pp > 1 and c.schedule != "zb-v":  # V: one rank holds both
        rows = -(-model.vocab_size // c.tp)
        seconds += collective_time(Collective("all-reduce", 4.0 * rows * model.d_model), 2,
                                   links.pp)
    return seconds


def _held_stages(c: Candidate, r: int) -> float:
    """Peak stage-microbatches (chunks, for several per rank) of activations rank r holds."""
    p, m, v = c.pp, c.microbatches, c.virtual_stages
    if c.schedule == "zb-v":
        return min(2 * p, 2 * m, m + 1 + r)
    if c.schedule == "interleaved-1f1b":  # Megatron's warm-up, then one more
        return min(2 * (p - r - 1) + (v - 1) * p + 1, m * v)
    if c.schedule == "gpipe":
        return m
    if c.schedule == "zb-h1":
        return min(p, m)
    if c.schedule == "zb-h2":  # up to p - 1 extra warm-up forwards (schedules.zero_bubble)
        x = min(p - 1, max(0, m - p))
        return min(m, p + min(p - 1 - r, x) + min(r, x))
    return min(p - r, m)


def estimate(model: ModelConfig, c: Candidate, cluster: Cluster, seq_len: int,
             global_batch: int, dp_bucket_mb: float = 25.0) -> Estimate:
    """Closed-form prediction of candidate ``c`` (see the module docstring)."""
    cost = costs(model, c, cluster, seq_len, dp_bucket_mb)
    p, v, m = c.pp, c.virtual_stages, c.microbatches
    ranks = [_stages_of(r, p, v, c.schedule) for r in range(p)]

    def work(stages: list[int], kinds: str) -> float:
        total = 0.0
        for s in stages:
            total += ("f" in kinds) * cost.f[s] + ("b" in kinds) * cost.b[s] + (
                "w" in kinds) * cost.w[s]
        return total

    per_mb = [work(st, "fbw") for st in ranks]
    busiest = max(range(p), key=lambda r: per_mb[r])
    R = per_mb[busiest]
    transfer = 2 * (p - 1) * cost.transfer_time()
    if c.schedule == "interleaved-1f1b":
        pipe = (m + (p - 1) / v) * R
    elif c.schedule in ("zb-h1", "zb-h2"):  # the same makespan; H2 fills the drain
        pipe = m * R + (p - 1) * max(work(ranks[busiest], "fb") - work(ranks[busiest], "w"), 0)
    elif c.schedule == "zb-v":
        pipe = m * R + (p - 1) * cost.f[0]
    else:
        pipe = (m + p - 1) * R
    pipe += transfer
    # the dp reduction of the last stage's grads: buckets hide under its last backward
    dp_tail = 0.0
    if cost.dp_reduce_s:
        last_b = max(cost.b[s] + cost.w[s] for s in ranks[0])
        total = sum(cost.dp_reduce_s[s] for s in ranks[0])
        n = sum(cost.dp_buckets[s] for s in ranks[0])
        dp_tail = max(total / n, total - last_b * (n - 1) / n)
        dp_tail += sum(cost.stage_value("dp_after_s", s) for s in ranks[0])
    step = pipe + dp_tail + cost.step_end_s
    tp_s = m * sum(cost.stage_value("tp_f_s", s) + cost.stage_value("tp_b_s", s)
                   for s in ranks[busiest])
    # per rank: its held chunks, each of its stages' average size, and its static bytes
    acts = [_held_stages(c, r) * sum(cost.activation_bytes[s] for s in st) / len(st)
            for r, st in enumerate(ranks)]
    mems = [a + sum(cost.static_bytes(s) for s in st) for a, st in zip(acts, ranks, strict=True)]
    return _finish(model, c, cluster, seq_len, global_batch, step_s=step, compute_s=m * R,
                   bubble=1 - m * R / pipe, tp_s=tp_s, dp_exposed_s=dp_tail,
                   peak_act=int(max(acts)), peak_mem=int(max(mems)))


def _finish(model: ModelConfig, c: Candidate, cluster: Cluster, seq_len: int,
            global_batch: int, *, step_s: float, compute_s: float, bubble: float, tp_s: float,
            dp_exposed_s: float, peak_act: int, peak_mem: int, simulated: bool = False
            ) -> Estimate:
    flops = model_flops(model, seq_len, global_batch)
    return Estimate(
        candidate=c, step_s=step_s, compute_s=compute_s, bubble=bubble, tp_s=tp_s,
        dp_exposed_s=dp_exposed_s, peak_memory_bytes=peak_mem, peak_activation_bytes=peak_act,
        tokens_per_s=global_batch * seq_len / step_s,
        mfu=flops / (step_s * cluster.gpus * cluster.device.peak_flops), simulated=simulated)


def _stages_of(rank: int, p: int, v: int, schedule: str) -> list[int]:
    if schedule == "zb-v":  # V placement: rank r holds stages r and 2p - 1 - r
        return [rank, 2 * p - 1 - rank]
    return [rank + k * p for k in range(v)]  # looped placement


def _layout(model: ModelConfig, c: Candidate, seq_len: int, global_batch: int,
            dp_bucket_mb: float) -> Layout:
    return resolve_layout(model, c.parallel_config(dp_bucket_mb), batch_size=global_batch,
                          seq_len=seq_len)


def profiled_costs(model: ModelConfig, cands: Sequence[Candidate], cluster: Cluster,
                   seq_len: int, global_batch: int, dp_bucket_mb: float = 25.0, *,
                   runtime: Runtime, repeats: int = 3) -> list[CostModel]:
    """Each candidate's costs with its compute timed on this machine (``sim.group_profile``).

    Every rank of each layout runs in its own local process at once, replaying its
    compute in schedule order: tp ranks on their shards with the real collectives
    inside, so F, I, W and B are measured whole (the tp share reported is the
    cluster's collective model's). The pipeline's messages, the dp reduction and the
    once-per-step reductions are the model's, on the cluster's device (with
    ``--profile``, collectives measured here: ``sim.gloo``); layouts are profiled in
    one launch per world size; ``repeats`` replayed steps each (after one warm-up);
    ``runtime`` is what runs them (``conveyor.runtime.profiling``).
    """
    jobs = profile_jobs_of(model, cands, seq_len, global_batch, dp_bucket_mb)
    profiles: list[dict[tuple[int, int, int], RankTimes]] = [{} for _ in jobs]
    for world in sorted({j.world for j in jobs}):
        mine = [i for i, j in enumerate(jobs) if j.world == world]
        for i, got in zip(mine, profile_jobs(model, [jobs[i] for i in mine], runtime=runtime,
                                             repeats=repeats), strict=True):
            profiles[i] = got
    return costs_from_times(model, cands, cluster, seq_len, jobs, profiles, dp_bucket_mb)


def profile_jobs_of(model: ModelConfig, cands: Sequence[Candidate], seq_len: int,
                    global_batch: int, dp_bucket_mb: float = 25.0) -> list[Job]:
    """What :func:`profiled_costs` replays for each candidate (its runtime layout)."""
    return [Job(_layout(model, c, seq_len, global_batch, dp_bucket_mb), c.microbatch_size,
                seq_len, {"none": False, "full": True}.get(c.recompute, c.recompute))
            for c in cands]


def costs_from_times(model: ModelConfig, cands: Sequence[Candidate], cluster: Cluster,
                     seq_len: int, jobs: Sequence[Job],
                     times: Sequence[dict[tuple[int, int, int], RankTimes]],
                     dp_bucket_mb: float = 25.0) -> list[CostModel]:
    """Each candidate's costs from its jobs' replay times (see :func:`profiled_costs`)."""
    return [_with_profile(model, c, cluster, seq_len, dp_bucket_mb, job, t)
            for c, job, t in zip(cands, jobs, times, strict=True)]


def _with_profile(model: ModelConfig, c: Candidate, cluster: Cluster, seq_len: int,
                  dp_bucket_mb: float, job: Job,
                  times: dict[tuple[int, int, int], RankTimes]) -> CostModel:
    """The model's costs of ``c`` with the profiled compute (and SP grad sums) in.

    Where the ranks were also timed alone (a pipeline without tp), each stage's costs
    are the alone ones plus the slowdown of replaying all at once in proportion to
    how busy the other ranks are while the stage computes (:func:`_overlap`, on the
    step simulated with the alone costs): ranks that take turns keep their alone costs.
    """
    c = replace(c, partition=job.layout.partition_method)
    mine = costs(model, c, cluster, seq_len, dp_bucket_mb)
    link = cluster.device.intra if c.tp <= cluster.gpus_per_node else cluster.device.inter
    # under SP each replicated param's grad is all-reduced over tp once per step
    sp_s = max((sum(collective_time(Collective("all-reduce", float(n)), c.tp, link)
                    for n in t.together.sp_grads) for t in times.values()), default=0.0)

    def timed(kind: str) -> CostModel:
        # a dp step waits for its slowest replica (the gradient all-reduce synchronises
        # them): each stage's costs are the slowest replica's medians
        per_dp = [costs_from_profiles(model, job.layout.partition,
                                      [getattr(t, kind) for (_, d, _), t in times.items()
                                       if d == dp_rank], microbatch_size=c.microbatch_size,
                                      seq_len=seq_len)
                  for dp_rank in sorted({d for _, d, _ in times})]
        def slowest(name: str) -> tuple[float, ...]:
            return tuple(max(v) for v in zip(*(getattr(k, name) for k in per_dp), strict=True))

        prof = replace(per_dp[0], f=slowest("f"), b=slowest("b"), w=slowest("w"),
                       full_b=slowest("full_b") if per_dp[0].full_b is not None else None)

        def within(comm: tuple[float, ...], whole: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(min(x, y) for x, y in zip(comm, whole, strict=True)) if comm else ()

        return replace(mine, f=prof.f, b=prof.b, w=prof.w, full_b=prof.full_b,
                       tp_f_s=within(mine.tp_f_s, prof.f), tp_b_s=within(mine.tp_b_s, prof.b),
                       step_start_s=prof.step_start_s, step_end_s=mine.step_end_s + sp_s,
                       source=f"{prof.source}, {job.world} ranks at once; messages, dp and "
                       "step-end reductions modelled")

    together = timed("together")
    if any(t.alone is None for t in times.values()):
        return together
    solo = timed("alone")
    # the simulated pipeline's other ranks, plus this rank's dp replicas (always busy with it)
    p, dp = job.layout.pp, job.layout.dp
    share = {s: ((dp - 1) + dp * (p - 1) * x) / (p * dp - 1)
             for s, x in _overlap(simulate(job.layout.schedule, solo).timeline).items()}

    def blend(a: tuple[float, ...] | None, t: tuple[float, ...] | None
              ) -> tuple[float, ...] | None:
        if a is None or t is None:
            return t
        return tuple(x + (y - x) * share.get(s, 1.0)
                     for s, (x, y) in enumerate(zip(a, t, strict=True)))

    return replace(together, f=blend(solo.f, together.f), b=blend(solo.b, together.b),
                   w=blend(solo.w, together.w), full_b=blend(solo.full_b, together.full_b),
                   source=together.source + "; alone and together weighed by overlap")


def _overlap(timeline: dict[int, list[TimedAction]]) -> dict[int, float]:
    """Per stage: the share of its compute time during which the other ranks compute too
    (averaged over the other ranks)."""
    spans = {r: sorted(((t.start, t.end, t) for t in row if t.action.kind.is_compute),
                       key=lambda x: (x[0], x[1])) for r, row in timeline.items()}
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for r, mine in spans.items():
        others = [q for q in spans if q != r]
        shared = [0.0] * len(mine)
        for q in others:  # both lists in time order: one sweep
            theirs, j = spans[q], 0
            for i, (b, e, _) in enumerate(mine):
                while j < len(theirs) and theirs[j][1] <= b:
                    j += 1
                k = j
                while k < len(theirs) and theirs[k][0] < e:
                    shared[i] += min(e, theirs[k][1]) - max(b, theirs[k][0])
                    k += 1
        for (b, e, t), x in zip(mine, shared, strict=True):
            for part in t.action.parts:
                num[part.stage] = num.get(part.stage, 0.0) + x / max(len(others), 1)
                den[part.stage] = den.get(part.stage, 0.0) + e - b
    return {s: num[s] / den[s] for s in den if den[s] > 0}


def simulate_candidate(model: ModelConfig, c: Candidate, cluster: Cluster, seq_len: int,
                       global_batch: int, dp_bucket_mb: float = 25.0, *,
                       profile: Runtime | None = None, cost: CostModel | None = None
                       ) -> Estimate:
    """The candidate run through the step simulator: exact under the cost model.

    ``profile`` (cpu only): time the compute here with this runtime
    (:func:`profiled_costs`); ``cost``: costs already profiled for ``c``.
    """
    layout = _layout(model, c, seq_len, global_batch, dp_bucket_mb)
    c = replace(c, partition=layout.partition_method)
    if cost is None:
        cost = (profiled_costs(model, [c], cluster, seq_len, global_batch, dp_bucket_mb,
                               runtime=profile)[0]
                if profile is not None else costs(model, c, cluster, seq_len, dp_bucket_mb))
    result = simulate(layout.schedule, cost)
    step = result.step_time
    busy = {r: result.execution.busy(r) for r in result.timeline}
    busiest = max(busy, key=busy.__getitem__)
    return _finish(model, c, cluster, seq_len, global_batch, step_s=step,
                   compute_s=busy[busiest], bubble=result.bubble_fraction,
                   tp_s=result.tp_seconds(busiest), dp_exposed_s=result.dp_exposed,
                   peak_act=max(result.peak_activation_bytes.values()),
                   peak_mem=max(result.peak_memory_bytes.values()), simulated=True)
