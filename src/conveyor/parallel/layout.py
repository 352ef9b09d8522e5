"""The layout of a run, decided once: ranks, schedule, stages and the blocks of each stage.

``resolve_layout`` is the only code that turns a config into those decisions::

    ModelConfig + ParallelConfig (+ batch size, measured block costs)
        -> schedule   by name, with virtual_stages chunks per rank (or the fewest the
                      schedule runs), or read from a hand-written CSV table
        -> partition  uniform | params | cost, over pp * chunks stages
        -> tp         checked against the model (heads, kv heads, MLP width; the
                      sequence length under sequence parallelism)
        -> Layout     pure data: what the runtime builds, the simulator and `trace`
                      predict, and `conveyor train` prints at start-up

Block costs default to analytic forward FLOPs (``models.block_forward_flops``): the
embedding, every layer and the head, whose vocab projection can weigh several
layers. ``partition='cost'`` splits by them exactly (``partition.by_cost``); for
the other methods they only predict each stage's share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PARTITIONS, ConfigError, ModelConfig, ParallelConfig
from ..models import block_forward_flops, block_param_counts
from ..schedules import SCHEDULE_CHUNKS, Placement, Schedule, ScheduleError, build_schedule
from ..schedules.table_file import read_schedule_csv
from .partition import Partition, balance_ranks, by_cost, by_params, stage_costs, uniform
from .tp_blocks import check_tensor_parallel

__all__ = [
    "Layout",
    "PARTITIONERS",
    "analytic_block_costs",
    "resolve_layout",
    "resolve_partition",
    "resolve_schedule",
]


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one run is laid out. Pure data; ``str(layout)`` shows all of it."""

    schedule: Schedule
    """Every pipeline rank's actions and the stage -> rank placement; pp is its rank count."""
    partition: Partition
    """The contiguous block range of every stage, one range per schedule stage."""
    partition_method: str
    """How ``partition`` was chosen: one of ``config.PARTITIONS`` ('uniform', 'params', 'cost')."""
    block_costs: tuple[float, ...]
    """Predicted relative cost of every block (embedding, layers, head); stage shares sum it."""
    cost_source: str
    """Where ``block_costs`` came from, e.g. 'analytic forward FLOPs at seq_len 128'."""
    dp: int = 1
    """Data-parallel replicas of the pipeline."""
    tp: int = 1
    """Tensor-parallel width of every stage."""
    sequence_parallel: bool = False
    """Under tp, norms, residuals and boundaries hold a sequence shard (T/tp positions)."""
    microbatch_size: int | None = None
    """Sequences per microbatch, when the batch size is known."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_costs", tuple(float(c) for c in self.block_costs))
        if self.partition.num_stages != self.schedule.num_stages:
            raise ConfigError(
                f"partition {self.partition} has {self.partition.num_stages} stages but schedule "
                f"{self.schedule.name!r} runs {self.schedule.num_stages}; build the partition "
                "for the schedule's stages (pp * virtual_stages)"
            )
        if len(self.block_costs) != self.partition.num_blocks:
            raise ConfigError(
                f"got {len(self.block_costs)} block costs for {self.partition.num_blocks} blocks; "
                "pass one cost per block: embedding, each layer, head"
            )
        for name in ("dp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel=True needs tp > 1; set tp or drop it")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ConfigError(f"microbatch_size={self.microbatch_size} must be >= 1 or None")

    # -- derived from the schedule: stored once, so they cannot disagree with it ---------

    @property
    def pp(self) -> int:
        """Pipeline ranks."""
        return self.schedule.num_ranks

    @property
    def placement(self) -> Placement:
        """Which pipeline rank holds each stage."""
        return self.schedule.placement

    @property
    def num_stages(self) -> int:
        """Stages in all: pp * virtual_stages."""
        return self.schedule.num_stages

    @property
    def virtual_stages(self) -> int:
        """Model chunks (stages) per pipeline rank."""
        return self.num_stages // self.pp

    @property
    def schedule_name(self) -> str:
        """The schedule's name (a table's own name for hand-written ones)."""
        return self.schedule.name

    @property
    def microbatches(self) -> int:
        """Microbatches per step per data-parallel replica."""
        return self.schedule.num_microbatches

    @property
    def world_size(self) -> int:
        """Processes: pp * dp * tp."""
        return self.pp * self.dp * self.tp

    # -- predictions ---------------------------------------------------------------------

    def stage_shares(self) -> list[float]:
        """Each stage's predicted share of the step's compute (sums to 1)."""
        costs = stage_costs(self.partition, self.block_costs)
        total = math.fsum(costs)
        return [c / total if total > 0 else 1.0 / len(costs) for c in costs]

    def rank_shares(self) -> list[float]:
        """Each pipeline rank's predicted share of the compute: the sum of its stages'."""
        shares = self.stage_shares()
        return [math.fsum(shares[s] for s in self.placement.stages_of(r)) for r in range(self.pp)]

    def imbalance(self) -> float:
        """The busiest rank's share over the mean share (1.0: perfectly balanced)."""
        return max(self.rank_shares()) * self.pp

    def to_dict(self) -> dict[str, Any]:
        """The decisions as plain values (for logs and run metadata); actions left out."""
        return {
            "pp": self.pp, "dp": self.dp, "tp": self.tp,
            "sequence_parallel": self.sequence_parallel, "virtual_stages": self.virtual_stages,
            "schedule": self.schedule_name, "placement": list(self.placement.stage_to_rank),
            "partition": self.partition_method,
            "stage_blocks": [list(b) for b in self.partition.bounds],
            "stage_shares": [round(s, 6) for s in self.stage_shares()],
            "microbatches": self.microbatches, "microbatch_size": self.microbatch_size,
        }

    def describe(self) -> str:
        """Everything this layout decides, as the lines `conveyor train` logs at start-up."""
        v, mbs = self.virtual_stages, self.microbatch_size
        size = f" of {mbs} sequence{'s' * (mbs != 1)}" if mbs is not None else ""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        lines = [
            f"layout: pp={self.pp} x dp={self.dp} x tp={self.tp}{sp} = {self.world_size} ranks, "
            f"schedule {self.schedule_name} ({self.placement.shape} placement, {v} stage"
            f"{'s' * (v != 1)} per rank), {self.microbatches} microbatches{size}",
            f"partition {self.partition_method} {self.partition}; predicted share of the "
            f"compute ({self.cost_source}):",
        ]
        n = self.partition.num_blocks
        for s, share in enumerate(self.stage_shares()):
            start, end = self.partition.bounds[s]
            lines.append(f"  stage {s} on rank {self.placement.rank_of(s)}: blocks "
                         f"{start}:{end} {_contents(start, end, n):<26} {share:6.1%}")
        if v > 1:
            for r, share in enumerate(self.rank_shares()):
                stages = ", ".join(map(str, self.placement.stages_of(r)))
                lines.append(f"  rank {r} (stages {stages}): {share:.1%}")
        lines.append(f"  busiest rank: {self.imbalance():.2f}x the mean")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _contents(start: int, end: int, num_blocks: int) -> str:
    """What blocks start..end-1 are, e.g. 'embedding + layers 0-4' (layer i is block i+1)."""
    parts = ["embedding"] if start == 0 else []
    first, last = max(start, 1) - 1, min(end, num_blocks - 1) - 2
    if last >= first:
        parts.append(f"layer {first}" if first == last else f"layers {first}-{last}")
    if end == num_blocks and num_blocks > 1:
        parts.append("head")
    return "(" + " + ".join(parts) + ")"


def resolve_schedule(*, name: str, pp: int, microbatches: int, virtual_stages: int | None = None,
                     schedule_file: str | None = None) -> Schedule:
    """The schedule of these settings: a CSV table when given, else built by name."""
    if schedule_file is not None:
        return read_schedule_csv(Path(schedule_file))
    # None in SCHEDULE_CHUNKS means "any count >= 2": the fewest holds the least in flight.
    chunks = virtual_stages if virtual_stages is not None else SCHEDULE_CHUNKS.get(name) or 2
    return build_schedule(name, pp, microbatches, chunks)


def analytic_block_costs(model: ModelConfig, seq_len: int | None = None) -> tuple[float, ...]:
    """Forward FLOPs of every block for one sequence (backward is proportional)."""
    return tuple(block_forward_flops(model, seq_len or model.max_seq_len))


def _uniform(model: ModelConfig, num_stages: int, _costs: Sequence[float],
             _ranks: Sequence[int] | None) -> Partition:
    return uniform(model.num_blocks, num_stages)


def _by_params(model: ModelConfig, num_stages: int, _costs: Sequence[float],
               _ranks: Sequence[int] | None) -> Partition:
    return by_params(block_param_counts(model), num_stages)


def _by_cost(_model: ModelConfig, num_stages: int, costs: Sequence[float],
             ranks: Sequence[int] | None) -> Partition:
    split = by_cost(costs, num_stages)
    return split if ranks is None else balance_ranks(costs, split, ranks)


PARTITIONERS: dict[
    str, Callable[[ModelConfig, int, Sequence[float], Sequence[int] | None], Partition]
] = {
    "uniform": _uniform,
    "params": _by_params,
    "cost": _by_cost,
}
"""``ParallelConfig.partition`` name -> how blocks are split into stages (same keys as
``config.PARTITIONS``, which validates the name before this is reached)."""


def resolve_partition(model: ModelConfig, num_stages: int, how: str = "cost",
                      block_costs: Sequence[float] | None = None,
                      ranks: Sequence[int] | None = None) -> Partition:
    """Blocks of ``model`` into ``num_stages`` stages by ``how`` ('cost' uses ``block_costs``).

    ``ranks[s]``, the rank running stage ``s``, lets 'cost' balance ranks holding
    several stages (their sums bound the step), not only the stages.
    """
    if how not in PARTITIONERS:
        raise ConfigError(f"partition={how!r} is unknown; use one of {', '.join(PARTITIONS)}")
    _check_stages(model, num_stages, num_stages)
    costs = analytic_block_costs(model) if block_costs is None else block_costs
    return PARTITIONERS[how](model, num_stages, costs, ranks)


def resolve_layout(
    model: ModelConfig,
    par: ParallelConfig,
    *,
    schedule: Schedule | None = None,
    block_costs: Sequence[float] | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    cost_source: str = "given block costs",
) -> Layout:
    """The one place that decides a run's schedule, chunks, partition and microbatches.

    ``schedule`` replaces the configured one (a hand-built schedule); ``block_costs``
    (one per block, e.g. profiled seconds) replace the analytic FLOPs; ``batch_size``
    is the global batch, which gives the microbatch size; ``seq_len`` (default: the
    model's) sizes the analytic costs. Raises ConfigError naming the value and the fix.
    """
    if schedule is None:
        schedule = _configured_schedule(par)
        where = (f"schedule_file={par.schedule_file!r}" if par.schedule_file is not None
                 else f"schedule {par.schedule!r}")
    else:
        where = f"the given schedule {schedule.name!r}"
    _check_schedule(par, schedule, where)
    _check_stages(model, schedule.num_stages, par.pp)
    seq = seq_len or model.max_seq_len
    if not 1 <= seq <= model.max_seq_len:
        raise ConfigError(f"seq_len={seq} must be in 1..max_seq_len={model.max_seq_len}")
    if block_costs is None:
        costs, source = analytic_block_costs(model, seq), f"analytic forward FLOPs at seq_len {seq}"
    else:
        costs, source = _checked_costs(model, block_costs), cost_source
    check_tensor_parallel(model, par.tp, sequence_parallel=par.sequence_parallel, seq_len=seq)
    microbatch_size = None
    if batch_size is not None:
        par.check_against(model, batch_size)
        microbatch_size = batch_size // (par.dp * par.microbatches)
    return Layout(
        schedule=schedule,
        partition=resolve_partition(
            model, schedule.num_stages, par.partition, costs,
            ranks=[schedule.placement.rank_of(s) for s in range(schedule.num_stages)],
        ),
        partition_method=par.partition,
        block_costs=costs,
        cost_source=source,
        dp=par.dp,
        tp=par.tp,
        sequence_parallel=par.sequence_parallel,
        microbatch_size=microbatch_size,
    )


def _configured_schedule(par: ParallelConfig) -> Schedule:
    try:
        return resolve_schedule(name=par.schedule, pp=par.pp, microbatches=par.microbatches,
                                virtual_stages=par.virtual_stages, schedule_file=par.schedule_file)
    except ScheduleError as err:
        if par.schedule_file is None:
            raise
        raise ConfigError(f"schedule_file={par.schedule_file!r}: {err}") from None


def _check_schedule(par: ParallelConfig, sched: Schedule, where: str) -> None:
    rows = " (rows)" if par.schedule_file is not None else ""
    if sched.num_ranks != par.pp:
        raise ConfigError(f"{where} has {sched.num_ranks} ranks{rows} but pp={par.pp}; "
                          f"set pp={sched.num_ranks} or edit the table")
    if sched.num_microbatches != par.microbatches:
        raise ConfigError(
            f"{where} runs {sched.num_microbatches} microbatches but microbatches="
            f"{par.microbatches}; set microbatches={sched.num_microbatches}"
        )
    if sched.forward_only:
        raise ConfigError(f"{where} has no backward actions, so it cannot train; add B "
                          "(and optionally W) actions for every F")
    if par.virtual_stages not in (None, sched.num_stages // par.pp):
        raise ConfigError(f"{where} places {sched.num_stages // par.pp} stages per rank but "
                          f"virtual_stages={par.virtual_stages}; leave virtual_stages unset")


def _check_stages(model: ModelConfig, num_stages: int, pp: int) -> None:
    if num_stages > model.num_blocks:
        raise ConfigError(
            f"layers={model.n_layers} (+ embedding and head = {model.num_blocks} blocks) "
            f"cannot be split into pp={pp} stages with virtual_stages={num_stages // pp} "
            f"({num_stages} stages); use pp*virtual_stages <= {model.num_blocks} or more layers"
        )


def _checked_costs(model: ModelConfig, block_costs: Sequence[float]) -> tuple[float, ...]:
    costs = tuple(float(c) for c in block_costs)
    if len(costs) != model.num_blocks:
        raise ConfigError(
            f"got {len(costs)} block costs for a model of {model.num_blocks} blocks "
            f"(embedding + {model.n_layers} layers + head); pass one cost per block"
        )
    bad = [i for i, c in enumerate(costs) if not math.isfinite(c) or c < 0]
    if bad:
        raise ConfigError(f"block cost {bad[0]} is {costs[bad[0]]!r}; every block cost must "
                          "be finite and >= 0 (e.g. measured seconds or FLOPs)")
    return costs
