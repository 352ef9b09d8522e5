"""Rank-side half of ``step_time.py``: build every case of a group, time its steps.

A *group* is one launched set of ranks. Every rank builds every case of its group
(a case is one implementation of one configuration: single process, a Conveyor
schedule, or its ``torch.distributed.pipelining`` counterpart), in the same order,
so that collective calls (process-group creation) match. Then all ranks run the
cases round-robin: each timed repetition runs every case once, starting at a
different case each time, so background noise hits all cases alike.

Every step of every case starts after a barrier over the whole group and is timed
on each rank from the barrier's exit to the end of that rank's work; the parent
takes the max over ranks. Single-process cases run on rank 0 while the other ranks
sleep in the next barrier.

Compute time (for the bubble):
  - Conveyor: the executor's own timeline (``executor.record``): F, B and W actions,
    less the waits for their inputs (a receive is waited on inside the action that
    reads it, and timed there as its own entry).
  - torch: wall time inside the stage's ``forward_one_chunk``, ``backward_one_chunk``
    and ``backward_weight_one_chunk`` plus the loss function, by wrapping those
    bound methods on each ``PipelineStage``. Receives are waited on by the schedule
    outside these methods. Waiting is not counted as compute on either side.

Loss scaling: Conveyor's last stage uses ``lm_loss / M`` per microbatch and sums
grads. torch's schedules, with ``scale_grads=True`` (their default), divide all grads
by M after the step and leave the loss as given; here they get
``scale_grads=False`` and ``loss_fn = lm_loss / M``: the identical arithmetic, so both
compute the same grads and sum(microbatch losses) is the same step loss.

Memory, per rank and case:
  - ``stash``: Conveyor's ``Pipeline.peak_stashed_bytes()``: the most bytes autograd
    held saved for backward on the rank at once (``conveyor.memory``). For torch the
    same count with the same tool: ``count_saved_bytes`` around each stage's
    ``forward_one_chunk`` and the loss, released at the full backward (or at W when
    backward is split), as Conveyor does. The hooks cost time, so torch is metered
    in the warmup steps only.
  - ``rss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read after the step, with the
    peak reset before it (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so it is
    the process's peak RSS while that case's step ran. It includes everything the
    process holds, also the weights of the other cases of its group; ``--isolate``
    gives every case its own processes for a clean per-case number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from conveyor.config import ConfigError, ModelConfig, ParallelConfig
from conveyor.memory import ActivationMeter, count_saved_bytes
from conveyor.models import Transformer, build_blocks, lm_loss
from conveyor.parallel.layout import resolve_layout
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.pipeline import Pipeline

TORCH_COUNTERPART: dict[str, str | None] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    # ZB1P of the zero-bubble paper; with one stage per rank it is ZB-H1's shape
    # (1F1B warmup, rank r keeps r extra B-before-W slots, W fills the cool-down)
    "zb-h1": "ScheduleInterleavedZeroBubble",
    "zb-h2": None,  # torch has no ZB-H2
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",  # same V placement; overlapped pairs run in order
    "v-half": None,  # torch has no controllable-memory V schedules
    "v-min": None,
}
_SINGLE_STAGE_CLASSES = {"ScheduleGPipe", "Schedule1F1B"}


@dataclass(frozen=True)
class Case:
    """One timed configuration."""

    impl: str  # "single" | "conveyor" | "torch"
    schedule: str  # conveyor schedule name ("none" for single); torch: the one it mirrors
    pp: int
    threads: int = 1
    torch_class: str | None = None
    partition: str = "uniform"  # how blocks are split: Conveyor's default is "cost"
    parallel: ParallelConfig | None = None
    """Conveyor's layout when it is more than pp ranks of ``schedule`` (tp, dp, buckets)."""
    label: str | None = None
    """The case's name where ``parallel`` makes the default one ambiguous."""

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        if self.impl == "single":
            return f"single-{self.threads}t"
        # conveyor-default: what `conveyor train` runs (balanced); torch: the uniform
        # split a user writes by hand; torch-balanced: torch given Conveyor's split
        suffix = {("conveyor", "cost"): "-default", ("conveyor", "uniform"): "-uniform",
                  ("torch", "cost"): "-balanced"}.get((self.impl, self.partition), "")
        return f"pp{self.pp}-{self.schedule}-{self.impl}{suffix}"

    def parallel_config(self, microbatches: int) -> ParallelConfig:
        """The Conveyor layout this case runs."""
        return self.parallel or ParallelConfig(pp=self.pp, schedule=self.schedule,
                                               microbatches=microbatches, partition=self.partition)


@dataclass(frozen=True)
class Spec:
    """Everything a group's ranks need (picklable)."""

    model: ModelConfig
    batch: int
    seq: int
    microbatches: int
    steps: int
    warmup: int
    seed: int
    lr: float
    timeout_s: float
    cases: tuple[Case, ...]
    label: str


def add_model_args(p: argparse._ActionsContainer) -> None:
    """The model and batch flags the step-time benchmarks share (GPT-2 style, 8 x 256)."""
    p.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")


def model_of(args: argparse.Namespace) -> ModelConfig:
    """The model ``add_model_args``' flags describe; a bad value exits with its message."""
    try:
        return ModelConfig(flavour=args.flavour, n_layers=args.layers, d_model=args.d_model,
                           n_heads=args.heads, vocab_size=args.vocab, max_seq_len=args.seq)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


# -- memory helpers -------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last reset) in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size() if obj.is_floating_point() else 0
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


# -- runners --------------------------------------------------------------------------


class _Runner:
    """A case as this rank sees it."""

    active = True
    error: str | None = None
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer | None = None

    def prepare(self) -> None:
        """Before the barrier: clear per-step records."""

    def step(self) -> float | None:
        """One training step; the loss where this rank knows it."""
        raise NotImplementedError

    def compute_s(self) -> float | None:
        """Seconds this rank computed in the last step (None: not measured)."""
        return None

    def peak_stash(self) -> int | None:
        return None

    def _finish_optim(self) -> None:
        if self.opt is not None:
            self.opt.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class SingleRunner(_Runner):
    """The plain ``Transformer`` on the whole global batch (rank 0 only)."""

    def __init__(self, spec: Spec, case: Case, rank: int, data: tuple[Tensor, Tensor]) -> None:
        self.active = rank == 0
        self.threads = case.threads
        self.params = []
        if self.active:
            self.model = Transformer(spec.model, spec.seed)
            self.params = list(self.model.parameters())
            if spec.lr:
                self.opt = torch.optim.SGD(self.params, lr=spec.lr)
        self.tokens, self.targets = data

    def prepare(self) -> None:
        torch.set_num_threads(self.threads)

    def step(self) -> float:
        loss = self.model.loss(self.tokens, self.targets)
        loss.backward()
        self._finish_optim()
        return float(loss.detach())

    def zero_grad(self) -> None:
        super().zero_grad()
        torch.set_num_threads(1)


class ConveyorRunner(_Runner):
    """Conveyor's ``Pipeline`` running one schedule."""

    def __init__(self, spec: Spec, case: Case, mesh: Mesh, data: tuple[Tensor, Tensor]) -> None:
        par = case.parallel_config(spec.microbatches)
        self.pipe = Pipeline(spec.model, par, mesh, seed=spec.seed, timeout_s=spec.timeout_s)
        self.pipe.executor.record = True
        self.params = self.pipe.parameters()
        if spec.lr:
            self.opt = torch.optim.SGD(self.params, lr=spec.lr)
        self.tokens, self.targets = data

    def prepare(self) -> None:
        self.pipe.executor.timeline.clear()

    def step(self) -> float:
        loss = self.pipe.train_step(self.tokens, self.targets)
        self._finish_optim()
        return loss

    def compute_s(self) -> float:
        # a compute action's span includes the wait for its input (the receive is timed
        # inside it, as its own entry): only the rest is compute
        timeline = self.pipe.executor.timeline
        spans = sum(t.end - t.start for t in timeline if t.action.kind.is_compute)
        return spans - sum(t.end - t.start for t in timeline if not t.action.kind.is_compute)

    def peak_stash(self) -> int:
        return self.pipe.peak_stashed_bytes()


class _StageModule(nn.Module):
    """A contiguous run of Conveyor blocks as one module, for ``PipelineStage``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class TorchRunner(_Runner):
    """``torch.distributed.pipelining`` on the same blocks, split the same way."""

    def __init__(
        self, spec: Spec, case: Case, rank: int, world: int, data: tuple[Tensor, Tensor]
    ) -> None:
        from torch.distributed import pipelining

        self.tokens, self.targets = data
        self._compute = 0.0
        # Activation bytes as Conveyor counts them (what autograd saves in F, released
        # at the full B or at W), metered in warmup steps only: the hooks cost time.
        self.meter = ActivationMeter()
        self.measure_memory = False
        self._held: dict[tuple[int, int], int] = {}
        self._loss_mb = 0
        self.params = []
        # A group of its own: a failed step can leave it with dangling messages.
        self.group = dist.new_group(
            list(range(world)), timeout=datetime.timedelta(seconds=min(spec.timeout_s, 120.0))
        )
        par = ParallelConfig(pp=case.pp, schedule=case.schedule, microbatches=spec.microbatches,
                             partition=case.partition)
        layout = resolve_layout(spec.model, par)  # the split and placement Conveyor runs
        placement = layout.placement
        num_stages = placement.num_stages
        partition = layout.partition
        mine = sorted(placement.stages_of(rank))
        self.has_first = 0 in mine
        self.has_last = num_stages - 1 in mine
        M = spec.microbatches

        def loss_fn(out: Tensor, tgt: Tensor) -> Tensor:
            t0 = time.perf_counter()
            with contextlib.ExitStack() as ctx:
                if self.measure_memory:
                    saved = ctx.enter_context(count_saved_bytes([]))
                try:
                    return lm_loss(out, tgt) / M
                finally:
                    self._compute += time.perf_counter() - t0
                    if self.measure_memory:  # Conveyor's F includes the loss
                        self._held[(num_stages - 1, self._loss_mb)] = (
                            self._held.get((num_stages - 1, self._loss_mb), 0) + saved.total)
                        self.meter.add(saved.total)

        stages = []
        for s in mine:
            blocks = build_blocks(spec.model, spec.seed, list(partition.blocks_of(s)))
            module = _StageModule(blocks)
            self.params += list(module.parameters())
            stage = pipelining.PipelineStage(
                module, s, num_stages, torch.device("cpu"), group=self.group
            )
            self._instrument(stage)
            stages.append(stage)
        cls = getattr(pipelining, case.torch_class)
        target = stages[0] if case.torch_class in _SINGLE_STAGE_CLASSES else stages
        self.schedule = cls(target, M, loss_fn=loss_fn, scale_grads=False)
        # GPipe and 1F1B are hand-written loops whose pipeline_order is only a description
        # (torch 2.13's 1F1B one is off by one on the last rank); what they run matches
        # Conveyor's order by reading their code. The runtime schedules run their list.
        self.same_order = (
            None if case.torch_class in _SINGLE_STAGE_CLASSES
            else _same_order(self.schedule, layout.schedule, rank)
        )
        if spec.lr:
            self.opt = torch.optim.SGD(self.params, lr=spec.lr)

    def _instrument(self, stage: Any) -> None:
        fwd, bwd, wgt = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk
        modules = list(stage.submod.modules())

        def forward_one_chunk(chunk: int, *args: Any, **kwargs: Any) -> Any:
            self._loss_mb = chunk
            t0 = time.perf_counter()
            with contextlib.ExitStack() as ctx:
                if self.measure_memory:
                    saved = ctx.enter_context(count_saved_bytes(modules))
                try:
                    return fwd(chunk, *args, **kwargs)
                finally:
                    self._compute += time.perf_counter() - t0
                    if self.measure_memory:
                        self._held[(stage.stage_index, chunk)] = saved.total
                        self.meter.add(saved.total)

        def backward_one_chunk(chunk: int, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return bwd(chunk, *args, **kwargs)
            finally:
                self._compute += time.perf_counter() - t0
                if self.measure_memory and kwargs.get("full_backward", True):
                    self.meter.release(self._held.pop((stage.stage_index, chunk), 0))

        def backward_weight_one_chunk(chunk: int, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return wgt(chunk, *args, **kwargs)
            finally:
                self._compute += time.perf_counter() - t0
                if self.measure_memory:
                    self.meter.release(self._held.pop((stage.stage_index, chunk), 0))

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk
        stage.backward_weight_one_chunk = backward_weight_one_chunk

    def prepare(self) -> None:
        self._compute = 0.0

    def step(self) -> float | None:
        losses: list[Tensor] | None = [] if self.has_last else None
        args = (self.tokens,) if self.has_first else ()
        target = self.targets if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        self._finish_optim()
        return float(sum(float(x.detach()) for x in losses)) if losses is not None else None

    def compute_s(self) -> float:
        return self._compute

    def peak_stash(self) -> int:
        return self.meter.peak


# torch and Conveyor share letters: I is the input-grad of a split backward, B a full one
_TORCH_KIND = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}


def _same_order(torch_schedule: Any, ours: Any, rank: int) -> bool | None:
    """Whether torch runs this rank's F/B/W in Conveyor's order (None: torch keeps no list)."""
    order = getattr(torch_schedule, "pipeline_order", None)
    if not order or rank not in order:
        return None
    theirs = [
        (a.stage_index, _TORCH_KIND[a.computation_type.name], a.microbatch_index)
        for action in order[rank] if action is not None
        for a in (action.sub_actions or (action,))  # an overlapped pair: its two halves
        if a.computation_type.name in _TORCH_KIND
    ]
    mine = [(a.stage, a.kind.value, a.microbatch) for a in ours.parts(rank)]
    return theirs == mine


# -- the group's main loop ---------------------------------------------------------------


def _agree_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def run_group(spec: Spec) -> dict[str, Any]:
    """Body of every rank of a group (called through ``conveyor.runtime.launch``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(spec.seed)
    seqs = torch.randint(spec.model.vocab_size, (spec.batch, spec.seq + 1), generator=gen)
    data = (seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous())
    meshes: dict[tuple[int, int, int], Mesh] = {}  # built in case order, the same on every rank

    runners: list[_Runner] = []
    for case in spec.cases:
        runner: _Runner
        err = None
        if case.impl == "single":
            runner = SingleRunner(spec, case, rank, data)
        elif case.impl == "conveyor":
            par = case.parallel_config(spec.microbatches)
            key = (par.pp, par.dp, par.tp)
            if key not in meshes:
                meshes[key] = Mesh.build(*key)
            runner = ConveyorRunner(spec, case, meshes[key], data)
        else:
            try:
                runner = TorchRunner(spec, case, rank, world, data)
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                runner, err = _Runner(), f"{type(e).__name__}: {e}"
        if not _agree_ok(err is None):
            runner = _Runner()
            runner.error = err or "failed to build on another rank"
            _say(rank, f"[{spec.label}] {case.name}: {runner.error}")
        runners.append(runner)

    records: list[list[dict[str, Any]]] = [[] for _ in spec.cases]
    losses: list[float | None] = [None] * len(spec.cases)
    can_reset = reset_peak_rss()
    n = len(spec.cases)
    total = spec.warmup + spec.steps
    t_start = time.perf_counter()
    for rep in range(total):
        timed = rep >= spec.warmup
        first = rep % n
        for k in range(n):
            i = (first + k) % n
            runner = runners[i]
            if runner.error is not None:
                continue
            runner.prepare()
            if isinstance(runner, TorchRunner):
                runner.measure_memory = not timed
            if timed and can_reset:
                reset_peak_rss()
            err = None
            dist.barrier()
            if runner.active:
                cpu0 = time.process_time()
                faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                try:
                    loss = runner.step()
                except Exception as e:  # noqa: BLE001
                    if spec.cases[i].impl != "torch":
                        raise
                    loss, err = None, f"{type(e).__name__}: {e}".splitlines()[0]
                elapsed = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
                if timed and err is None:
                    records[i].append({
                        "step_s": elapsed, "cpu_s": cpu, "compute_s": runner.compute_s(),
                        "rss": peak_rss_bytes(), "rep": rep - spec.warmup, "faults": faults,
                    })
                if loss is not None and not math.isnan(loss):
                    losses[i] = loss
            runner.zero_grad()
            if spec.cases[i].impl == "torch" and not _agree_ok(err is None):
                runner.error = err or "failed on another rank"
                _say(rank, f"[{spec.label}] {spec.cases[i].name}: {runner.error}")
        elapsed = time.perf_counter() - t_start
        _say(rank, f"[{spec.label}] {'step' if timed else 'warmup'} {rep + 1}/{total} "
             f"done ({elapsed:.0f}s)")
    dist.barrier()
    return {
        "rank": rank,
        "records": records,
        "losses": losses,
        "errors": [r.error for r in runners],
        "stash": [r.peak_stash() for r in runners],
        "same_order": [getattr(r, "same_order", None) for r in runners],
        "rss_reset": can_reset,
    }
