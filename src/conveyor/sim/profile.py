"""Profiled costs: time the runtime's own stage runner on this machine.

Each stage is built the way ``runtime.pipeline.Pipeline`` builds it: the same blocks
(the partition's, ``build_blocks`` with the same seed) in the runtime's
``StageRunner``, with the same recompute, autocast dtype and split backward (only
stages whose schedule has an I defer weight-grads), one thread per rank. The
runner's own methods are timed:

- **F**: ``forward`` (on the last stage including the loss, as the runtime runs it);
- **B** (``full_b``): ``backward(defer_weights=False)``, a full backward;
- **I** (``b``): ``backward(defer_weights=True)``: the linears file their weight-grads;
- **W** (``w``): ``weight``, which runs what the I filed.

Given a :class:`~conveyor.parallel.layout.Layout`, every rank's compute actions are
*replayed*: run in the schedule's order with its microbatches in flight, a fresh
random tensor standing in for each received one (allocated outside the timing, as
the runtime receives into fresh buffers) and stages of one rank handing over
locally, as the executor does. What a stage costs depends on what ran before it
(caches, the allocator, the grads of the first microbatch), so this times what the
runtime runs. Each cost is the median over all its actions in ``repeats`` replayed
steps after ``warmup`` ones. Kinds a schedule never runs on a stage (I and W of an
unsplit stage, B of a split one) are timed in isolation so the model prices any
schedule. :func:`replay_rank` is one rank's part: run it in every rank's process at
once (``benchmarks/sim_accuracy.py`` does) and the costs include the ranks sharing
the machine; :func:`profile_costs` replays the ranks one after another here.

Without a schedule (a bare partition), each stage is timed in isolation: F and B on
a runner built without split backward, I and W on one built with it.

- **activation bytes**: what the runner's meter counts for one stashed microbatch
  (the bytes autograd saves, as ``conveyor.memory`` counts them), so predicted and
  measured peaks use one definition.
- **link and executor**: gloo between processes cannot be timed in one process; the
  constants measured from runtime timelines in :mod:`conveyor.sim.analytic` are used
  (:func:`~conveyor.sim.analytic.gloo_runtime_costs`).
- **step start**: how much longer each rank's first action of a replayed step takes
  than the median of its kind (``CostModel.step_start_s``).

``sim`` does not import the runtime (``tests/test_layering.py``): the caller hands
the runtime's ``StageRunner`` in (``runner=``; ``conveyor.runtime.profiling``
gathers what profiling needs from the runtime in one :class:`Runtime`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.memory import ActivationMeter
from conveyor.models import build_blocks, tie_weights
from conveyor.models.families import family_of
from conveyor.parallel.layout import Layout
from conveyor.parallel.partition import Partition
from conveyor.schedules import Kind

from .activations import recompute_mode
from .analytic import gloo_runtime_costs
from .cost import CostError, CostModel

__all__ = [
    "RankProfile",
    "Launcher",
    "RankReplay",
    "Runtime",
    "StageFactory",
    "StageLike",
    "costs_from_profiles",
    "profile_costs",
    "profile_stage",
    "replay_rank",
]


class StageLike(Protocol):
    """What the profiler calls on a stage runner: the runtime's ``StageRunner`` API."""

    meter: ActivationMeter

    def forward(self, mb: int, inputs: Any, targets: Tensor | None, *,
                train: bool = True) -> dict[str, Tensor]: ...

    def backward(self, mb: int, grads: dict[str, Tensor] | None, *,
                 defer_weights: bool = False) -> dict[str, Tensor] | None: ...

    def weight(self, mb: int) -> None: ...

    def take_losses(self) -> list[Tensor]: ...


StageFactory = Callable[..., StageLike]
"""Builds a runner: ``(stage, {block index: module}, *, num_microbatches, recompute,
split_backward, autocast_dtype, meter)``, the runtime's ``StageRunner`` signature."""


Launcher = Callable[..., dict[int, Any]]
"""Runs a function on local ranks: the runtime's ``launch(fn, world, *args, backend=,
timeout_s=)``, returning each rank's result."""


@dataclass(frozen=True)
class Runtime:
    """What profiling runs of the runtime, handed down by a layer that may import it."""

    launch: Launcher
    """Starts local ranks with a process group (``runtime.launch.launch``)."""
    stage_runner: StageFactory
    """Builds a stage's runner (``runtime.stage.StageRunner``)."""


@dataclass
class RankProfile:
    """What profiling one rank found: seconds per (stage, kind letter), bytes per stage."""

    times: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    """Every timed action's seconds, by stage and kind ('F', 'B', 'I', 'W')."""
    activation_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes the meter counts for one stashed microbatch of each stage."""
    param_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes of each stage's parameters."""
    first: list[tuple[int, str, float]] = field(default_factory=list)
    """The first action of each replayed step: (stage, kind, seconds)."""
    sp_grads: list[int] = field(default_factory=list)
    """Bytes of each parameter whose grad the runtime sums over tp after the step (SP)."""

    def add(self, stage: int, kind: str, seconds: float) -> None:
        """Record one timed action."""
        self.times.setdefault((stage, kind), []).append(seconds)


def _params(blocks: Iterable[nn.Module]) -> list[nn.Parameter]:
    return list({id(p): p for b in blocks for p in b.parameters()}.values())


@dataclass(frozen=True)
class _Data:
    """Random stand-ins for what a stage gets: its family's inputs, targets, boundary tensors."""

    cfg: ModelConfig
    microbatch_size: int
    seq_len: int
    seed: int
    partition: Partition | None = None
    """Where the cuts are (what crosses one may depend on it); None: after block 0."""
    tp: int = 1
    sequence_parallel: bool = False
    """Tensor-parallel width and SP: boundaries of a tp rank hold a sequence shard under SP."""

    def _example(self, mb: int) -> tuple[Any, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + mb)
        return family_of(self.cfg).example(self.cfg, self.microbatch_size, self.seq_len, gen)

    def tokens(self, mb: int) -> Any:
        return self._example(mb)[0]

    def targets(self, mb: int) -> Any:
        return self._example(mb)[1]

    def cut(self, stage: int, *, before: bool) -> int:
        """The block after which the cut into (before) or out of ``stage`` lies."""
        if self.partition is None:
            return 0
        start, end = self.partition.bounds[stage]
        return start - 1 if before else end - 1

    def boundary(self, after_block: int = 0) -> dict[str, Tensor]:
        # a fresh buffer per message, as the runtime receives into; masks all ones
        first = self.tokens(0)
        shapes = ({"tokens": tuple(first.shape)} if isinstance(first, Tensor)
                  else {k: tuple(t.shape) for k, t in first.items()})
        sig = family_of(self.cfg).signature(self.cfg, shapes, after_block, tp=self.tp,
                                            sequence_parallel=self.sequence_parallel)
        return {name: torch.randn(spec.shape).to(spec.dtype) if spec.dtype.is_floating_point
                else torch.ones(spec.shape, dtype=spec.dtype) for name, spec in sig.items()}


BlockBuilder = Callable[[ModelConfig, int, list[int]], list[nn.Module]]
"""Builds blocks ``(cfg, seed, indices)``: ``models.build_blocks``, or a tp rank's shards."""


def _factory(cfg: ModelConfig, partition: Partition, runner: StageFactory, seed: int,
             num_microbatches: int, recompute: bool | str,
             autocast_dtype: torch.dtype | None,
             build: BlockBuilder = build_blocks) -> Callable[..., StageLike]:
    make_runner = runner

    def make(stage: int, split_backward: bool, meter: ActivationMeter | None = None,
             blocks: list[nn.Module] | None = None) -> StageLike:
        idx = list(partition.blocks_of(stage))
        # blocks of its own: a runner attaches its weight-grad store to its blocks
        blocks = blocks if blocks is not None else build(cfg, seed, idx)
        return make_runner(stage, dict(zip(idx, blocks, strict=True)),
                           num_microbatches=num_microbatches, recompute=recompute,
                           split_backward=split_backward, autocast_dtype=autocast_dtype,
                           meter=meter or ActivationMeter())

    return make


def profile_stage(
    make_runner: Callable[[bool], StageLike],
    *,
    split: bool,
    first: bool,
    last: bool,
    data: _Data,
    kinds: str = "FBIW",
    warmup: int = 2,
    repeats: int = 5,
    stage: int = 0,
    into: RankProfile | None = None,
) -> RankProfile:
    """Time ``kinds`` of one stage in isolation, each on its own fresh forward.

    ``make_runner(split_backward)`` builds a runner of the stage's blocks; ``split`` says
    how the runtime builds it: F and B are timed on that one, I and W on a split one.
    """
    out = into if into is not None else RankProfile()
    targets = data.targets(10**6) if last else None
    grads = None if last else data.boundary(data.cut(stage, before=False))
    plain = make_runner(split) if set(kinds) & {"F", "B"} else None
    split_runner = (plain if split and plain is not None else make_runner(True)) \
        if set(kinds) & {"I", "W"} else None
    clock = time.perf_counter
    mb = 0
    for rep in range(warmup + repeats):
        for r, mine in ((plain, "FB"), (split_runner, "FIW")):
            if r is None:
                continue
            inputs: Any = data.tokens(mb) if first else data.boundary(data.cut(stage, before=True))
            live = r.meter.live_by.get("stash", 0)
            t0 = clock()
            r.forward(mb, inputs, targets)
            t1 = clock()
            stashed = r.meter.live_by.get("stash", 0) - live
            if mine == "FB":
                r.backward(mb, grads, defer_weights=False)
                times = {"F": t1 - t0, "B": clock() - t1}
            else:
                r.backward(mb, grads, defer_weights=True)
                t2 = clock()
                r.weight(mb)
                times = {"I": t2 - t1, "W": clock() - t2}
                if split:
                    times["F"] = t1 - t0
            r.take_losses()
            mb += 1
            if rep >= warmup:
                for kind, seconds in times.items():
                    if kind in kinds:
                        out.add(stage, kind, seconds)
            out.activation_bytes.setdefault(stage, stashed)
    return out


class RankReplay:
    """One rank's compute actions, replayed in the schedule's order on its own runners.

    :meth:`step` runs the rank's list once (timing each action when asked to);
    :meth:`finish` times what the schedule never runs and returns the profile.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layout: Layout,
        rank: int,
        *,
        microbatch_size: int,
        seq_len: int,
        seed: int = 0,
        recompute: bool | str = False,
        autocast_dtype: torch.dtype | None = None,
        runner: StageFactory,
        build: BlockBuilder = build_blocks,
    ) -> None:
        sched = layout.schedule
        self.rank = rank
        self.actions = sched.actions[rank]
        self.last = sched.num_stages - 1
        self.split = {p.stage for p in sched.parts() if p.kind is Kind.I}
        self.make = _factory(cfg, layout.partition, runner, seed, sched.num_microbatches,
                             recompute, autocast_dtype, build)
        self.data = _Data(cfg, microbatch_size, seq_len, seed, layout.partition, layout.tp,
                          layout.sequence_parallel)
        self.meter = ActivationMeter()  # stages of one rank share a meter, as in the runtime
        self.stages = sched.placement.stages_of(rank)
        blocks = {s: build(cfg, seed, list(layout.partition.blocks_of(s))) for s in self.stages}
        if cfg.tie_embeddings and 0 in blocks and self.last in blocks and self.last != 0:
            tie_weights(blocks[0][0], blocks[self.last][-1])  # one table on this rank, as Pipeline ties it
        self.runners = {s: self.make(s, s in self.split, self.meter, blocks[s])
                        for s in self.stages}
        self.params = [p for s in self.stages for p in _params(blocks[s])]
        self.targets = {m: self.data.targets(10**6 + m) for m in range(sched.num_microbatches)}
        self.profile = RankProfile(param_bytes={
            s: sum(p.numel() * p.element_size() for p in _params(blocks[s])) for s in self.stages},
            sp_grads=[p.numel() * p.element_size() for s in self.stages for p in _params(blocks[s])
                      if getattr(p, "sequence_parallel", False)])

    def step(self, record: bool = True) -> None:
        """Run every compute action of the rank once, in order, on one thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # each pipeline rank runs on one thread
        try:
            self._step(record)
        finally:
            torch.set_num_threads(threads)

    def _step(self, record: bool) -> None:
        data, last, runners, out = self.data, self.last, self.runners, self.profile
        clock = time.perf_counter
        for p in self.params:  # a step starts without grads (Pipeline.train_step)
            p.grad = None
        local: dict[tuple[str, int, int], dict[str, Tensor]] = {}
        first = True
        for action in self.actions:
            for a in action.parts:
                s, m = a.stage, a.microbatch
                r = runners[s]
                if a.kind is Kind.F:
                    inputs: Any = (data.tokens(m) if s == 0
                                   else local.pop(("F", s, m), None)
                                   or data.boundary(data.cut(s, before=True)))
                    live = self.meter.live_by.get("stash", 0)
                    t0 = clock()
                    out_f = r.forward(m, inputs, self.targets[m] if s == last else None)
                    seconds = clock() - t0
                    out.activation_bytes[s] = self.meter.live_by.get("stash", 0) - live
                    if s < last and s + 1 in runners:  # handed over locally
                        local[("F", s + 1, m)] = {k: t.detach() for k, t in out_f.items()}
                elif a.kind.is_backward:
                    grads = (None if s == last
                             else local.pop(("B", s, m), None)
                             or data.boundary(data.cut(s, before=False)))
                    t0 = clock()
                    grad_in = r.backward(m, grads, defer_weights=a.kind is Kind.I)
                    seconds = clock() - t0
                    if s > 0 and s - 1 in runners and grad_in is not None:
                        local[("B", s - 1, m)] = {k: t.detach() for k, t in grad_in.items()}
                else:
                    t0 = clock()
                    r.weight(m)
                    seconds = clock() - t0
                if record:
                    if first:
                        out.first.append((s, a.kind.value, seconds))
                    first = False
                    out.add(s, a.kind.value, seconds)
        for r in runners.values():
            r.take_losses()

    def finish(self, isolated_repeats: int = 3) -> RankProfile:
        """Time, alone, the kinds the schedule never runs on a stage; the rank's profile."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for s in self.stages:
                missing = "".join(k for k in "FBIW" if (s, k) not in self.profile.times)
                if missing:
                    profile_stage(lambda split_backward, s=s: self.make(s, split_backward),
                                  split=s in self.split, first=s == 0, last=s == self.last,
                                  data=self.data, kinds=missing, warmup=1,
                                  repeats=isolated_repeats, stage=s, into=self.profile)
        finally:
            torch.set_num_threads(threads)
        return self.profile


def replay_rank(
    cfg: ModelConfig,
    layout: Layout,
    rank: int,
    *,
    microbatch_size: int,
    seq_len: int,
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 3,
    recompute: bool | str = False,
    autocast_dtype: torch.dtype | None = None,
    runner: StageFactory,
    sync: Callable[[], None] | None = None,
    isolated_repeats: int = 3,
    build: BlockBuilder = build_blocks,
) -> RankProfile:
    """Time every compute action of ``rank``'s list over ``warmup + repeats`` replayed steps.

    ``sync`` (e.g. a barrier) is called before each step, so that ranks replaying at
    once in their own processes start their steps together.
    """
    replay = RankReplay(cfg, layout, rank, microbatch_size=microbatch_size, seq_len=seq_len,
                        seed=seed, recompute=recompute, autocast_dtype=autocast_dtype,
                        runner=runner, build=build)
    for step in range(warmup + repeats):
        if sync is not None:
            sync()
        replay.step(record=step >= warmup)
    return replay.finish(isolated_repeats)


def costs_from_profiles(
    cfg: ModelConfig,
    partition: Partition,
    profiles: Sequence[RankProfile] | Mapping[Any, RankProfile],
    *,
    microbatch_size: int,
    seq_len: int,
    optimizer_states: int = 2,
    source: str = "profiled StageRunner on cpu",
) -> CostModel:
    """A CostModel from profiles covering every stage: the median of each cost."""
    merged = RankProfile()
    for prof in profiles.values() if isinstance(profiles, Mapping) else profiles:
        for key, values in prof.times.items():
            merged.times.setdefault(key, []).extend(values)
        merged.activation_bytes.update(prof.activation_bytes)
        merged.param_bytes.update(prof.param_bytes)
        merged.first.extend(prof.first)
    n = partition.num_stages

    def med(kind: str) -> tuple[float, ...]:
        missing = [s for s in range(n) if not merged.times.get((s, kind))]
        if missing:
            raise CostError(f"no {kind} timings for stages {missing}; profile every stage")
        return tuple(statistics.median(merged.times[(s, kind)]) for s in range(n))

    data = _Data(cfg, microbatch_size, seq_len, 0, partition)
    sizes = [sum(t.numel() * t.element_size()
                 for t in data.boundary(data.cut(s, before=False)).values())
             for s in range(n - 1)]
    message = max(sizes, default=0)
    if message == 0:  # a single stage sends nothing; size the message as a hidden state
        message = microbatch_size * seq_len * cfg.d_model * 4
    params = tuple(merged.param_bytes[s] for s in range(n))
    medians = {key: statistics.median(v) for key, v in merged.times.items()}
    step_start = statistics.fmean(
        [max(0.0, seconds - medians[(s, k)]) for s, k, seconds in merged.first] or [0.0])
    return CostModel(
        f=med("F"),
        b=med("I"),
        w=med("W"),
        full_b=med("B"),
        activation_bytes=tuple(merged.activation_bytes[s] for s in range(n)),
        param_bytes=params,
        # gradients and optimizer moments in fp32, one each per parameter element
        optimizer_bytes=tuple(p * (1 + optimizer_states) for p in params),
        **gloo_runtime_costs(message),  # type: ignore[arg-type]
        step_start_s=step_start,
        source=source,
    )


def profile_costs(
    cfg: ModelConfig,
    partition: Partition | Layout,
    *,
    microbatch_size: int,
    seq_len: int,
    seed: int = 0,
    warmup: int | None = None,
    repeats: int | None = None,
    optimizer_states: int = 2,
    recompute: bool | str = False,
    autocast_dtype: torch.dtype | None = None,
    runner: StageFactory,
) -> CostModel:
    """Time every stage of ``cfg`` as the runtime runs it; return a CostModel in seconds.

    With a :class:`~conveyor.parallel.layout.Layout`, every rank's actions are replayed
    in its schedule's order (:func:`replay_rank`, one rank after another in this
    process; ``repeats`` replayed steps after ``warmup``, default 2 after 1: each step
    times every stage m times); with a bare partition each stage is timed in isolation
    (``repeats`` times after ``warmup``, default 5 after 2). ``recompute`` and ``autocast_dtype`` are the
    runtime's (``ParallelConfig.recompute``, bf16); ``runner`` builds a stage runner
    (the runtime's ``StageRunner``).
    """
    layout = partition if isinstance(partition, Layout) else None
    part = layout.partition if layout is not None else partition
    assert isinstance(part, Partition)
    if part.num_blocks != cfg.num_blocks:
        raise CostError(
            f"partition {part} covers {part.num_blocks} blocks but the model has "
            f"{cfg.num_blocks} (n_layers={cfg.n_layers} + embedding + head); "
            f"build the partition with num_blocks={cfg.num_blocks}"
        )
    if layout is not None:
        warmup, repeats = 1 if warmup is None else warmup, 2 if repeats is None else repeats
    else:
        warmup, repeats = 2 if warmup is None else warmup, 5 if repeats is None else repeats
    how = ([f"recompute {recompute_mode(recompute)}"] * bool(recompute)
           + [f"autocast {autocast_dtype}"] * (autocast_dtype is not None))
    profiles: list[RankProfile] = []
    if layout is not None:
        for rank in range(layout.pp):
            profiles.append(replay_rank(
                cfg, layout, rank, microbatch_size=microbatch_size, seq_len=seq_len, seed=seed,
                warmup=warmup, repeats=repeats, recompute=recompute,
                autocast_dtype=autocast_dtype, runner=runner))
        how.insert(0, f"{layout.schedule_name} replayed per rank, median over {repeats} steps")
    else:
        make = _factory(cfg, part, runner, seed, 1, recompute, autocast_dtype)
        data = _Data(cfg, microbatch_size, seq_len, seed, part)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # each pipeline rank runs on one thread
        try:
            for s in range(part.num_stages):
                prof = profile_stage(lambda split_backward, s=s: make(s, split_backward),
                                     split=False, first=s == 0,
                                     last=s == part.num_stages - 1, data=data,
                                     warmup=warmup, repeats=repeats, stage=s)
                blocks = build_blocks(cfg, seed, list(part.blocks_of(s)))
                prof.param_bytes[s] = sum(p.numel() * p.element_size() for p in _params(blocks))
                profiles.append(prof)
        finally:
            torch.set_num_threads(threads)
        how.insert(0, f"each stage alone, median of {repeats}")
    return costs_from_profiles(cfg, part, profiles, microbatch_size=microbatch_size,
                               seq_len=seq_len, optimizer_states=optimizer_states,
                               source=f"profiled StageRunner on cpu, 1 thread ({', '.join(how)})")
