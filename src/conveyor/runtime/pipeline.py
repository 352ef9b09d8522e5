"""A rank's whole share of a pipeline-parallel model: stages, schedule, communication.

``Pipeline`` builds only this rank's blocks (every block is initialised from its
own seed, so the pieces equal the single-process model; under tensor parallelism
each is then sliced into this tp rank's shard), runs one step of any schedule
through the executor, and makes the distributed pieces add up: sequence-parallel
grads summed over tp, tied embedding grads summed across the two stages holding
them (per tp rank: both copies hold the same vocabulary rows), grads averaged over
data-parallel replicas (in buckets started as backward completes them, see
``parallel.data``; reduce-scattered into ZeRO-1 chunks under ``zero=1``, see
``parallel.zero``), the loss reduced onto every rank. The optimizer stays
outside: it sees this rank's parameters (shards, under tp; ``Pipeline.zero``'s
chunks under ZeRO-1) like any other module's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig, ParallelConfig
from ..log import get_logger
from ..memory import ActivationMeter
from ..models import build_blocks, tie_weights
from ..models.boundary import Signature
from ..models.families import family_of
from ..models.objective import Targets, target_counts
from ..parallel.data import GradBuckets
from ..parallel.layout import Layout, resolve_layout
from ..parallel.mesh import Mesh
from ..parallel.sharded import TensorParallel, reduce_sequence_parallel_grads
from ..parallel.tp_blocks import build_tp_blocks, tp_owners
from ..parallel.zero import ZeroShards
from ..schedules import Action, Kind, Schedule, lower, validate
from .comm import P2P
from .executor import Executor, StepInputs
from .lending import cannot_lend, lent_threads
from .links import NCCL_SEMANTICS_ENV, connect, nccl_semantics_requested
from .stage import StageRunner

__all__ = ["BatchError", "Pipeline", "NCCL_SEMANTICS_ENV"]

log = get_logger(__name__)


class BatchError(ValueError):
    """A batch given to ``train_step``/``eval_step`` does not fit the pipeline."""


Inputs = Tensor | Mapping[str, Tensor]
"""A decoder's token ids, or another family's named inputs (see ``models.families``)."""


def _named(x: Inputs, what: str) -> Mapping[str, Tensor]:
    if isinstance(x, Tensor):
        return {what: x}
    if not x:
        raise BatchError(f"{what} are empty; pass the family's named tensors")
    return {f"{what}[{k!r}]": t for k, t in x.items()}


class Pipeline:
    """This rank's stages of the model and the machinery to train them with a schedule.

    What runs where is a :class:`~conveyor.parallel.layout.Layout`: pass one (resolved
    once, e.g. by the trainer's parent process), or let ``resolve_layout`` make it from
    ``model`` and ``par`` (with ``schedule`` replacing the configured schedule).
    """

    def __init__(
        self,
        model: ModelConfig,
        par: ParallelConfig,
        mesh: Mesh,
        *,
        seed: int = 0,
        schedule: Schedule | None = None,
        layout: Layout | None = None,
        device: torch.device | None = None,
        timeout_s: float = 300.0,
        autocast_dtype: torch.dtype | None = None,
        emulate_nccl: bool | None = None,
    ) -> None:
        self.model_cfg = model
        self.par = par
        self.mesh = mesh
        self.device = device or torch.device("cpu")
        if layout is None:
            layout = resolve_layout(model, par, schedule=schedule)
        elif schedule is not None:
            raise ValueError("pass schedule= or layout=, not both: a Layout holds its schedule")
        if (layout.pp, layout.dp, layout.tp) != (mesh.pp, mesh.dp, mesh.tp):
            raise ValueError(
                f"layout pp={layout.pp} dp={layout.dp} tp={layout.tp} does not match mesh "
                f"pp={mesh.pp} dp={mesh.dp} tp={mesh.tp}; build the mesh with "
                f"Mesh.build({layout.pp}, {layout.dp}, {layout.tp})"
            )
        if layout.partition.num_blocks != model.num_blocks:
            raise ValueError(
                f"layout partition {layout.partition} covers {layout.partition.num_blocks} "
                f"blocks but the model has {model.num_blocks}; resolve the layout for this model"
            )
        self.layout = layout
        self.schedule = layout.schedule
        self.stats = validate(self.schedule)
        self.num_microbatches = self.schedule.num_microbatches
        placement = self.schedule.placement
        self.partition = layout.partition
        my_stages = placement.stages_of(mesh.pp_rank)
        # only stages with an I defer weight-grads (and pay for the deferring linears)
        split = {p.stage for p in self.schedule.parts() if p.kind is Kind.I}
        self.stages: dict[int, StageRunner] = {}
        self.meter = ActivationMeter()
        self.tp_group = mesh.tp_group if mesh.tp > 1 else None
        self.sequence_parallel = layout.sequence_parallel
        # logical parameter name -> (tensor-parallel layer, name in it), for gathers
        self._owners: dict[str, tuple[TensorParallel, str]] = {}
        for s in my_stages:
            idx = list(self.partition.blocks_of(s))
            built = (build_blocks(model, seed, idx) if self.tp_group is None else
                     build_tp_blocks(model, seed, idx, self.tp_group,
                                     sequence_parallel=self.sequence_parallel))
            blocks = [b.to(self.device) for b in built]
            for i, b in zip(idx, blocks, strict=True):
                self._owners.update(tp_owners(b, f"blocks.{i}."))
            self.stages[s] = StageRunner(
                s, dict(zip(idx, blocks, strict=True)),
                num_microbatches=self.num_microbatches, recompute=par.recompute, compile=par.compile,
                split_backward=s in split, autocast_dtype=autocast_dtype, meter=self.meter,
            )
        self.tied_group: dist.ProcessGroup | None = None
        self._tied_param: nn.Parameter | None = None
        if model.tie_embeddings:
            self._tie(placement.rank_of(0), placement.rank_of(self.schedule.num_stages - 1))
        lowered = lower(self.schedule)
        self.p2p = self._make_p2p(lowered, timeout_s, nccl_semantics_requested(emulate_nccl))
        self.executor = Executor(
            lowered, mesh.pp_rank, self.stages, self.p2p, meter=self.meter
        )
        self.executor.threads = self._lent_threads(self.schedule)
        if par.lend_cores and mesh.rank == 0:
            why_not = cannot_lend(self.device, layout.world_size, compiled=par.compile)
            if why_not is not None:
                log.warning("lend_cores: no cores are lent: %s", why_not)
            else:
                log.info("lend_cores: rank 0 runs %s on idle ranks' cores too",
                         ", ".join(f"{a} ({n} threads)" for a, n in self.executor.threads.items())
                         or "no action (its schedule leaves no rank idle while it computes)")
        # stages in the order their grads become final on this rank (the buckets' order)
        done_at = self.executor.stage_done_at
        self._done_order = sorted(self.stages, key=lambda s: (done_at.get(s, 1 << 30), s))
        # ZeRO-1: the optimizer steps this dp rank's chunks, whose grads are reduce-scattered
        self.zero = (ZeroShards(self.named_parameters(), mesh.dp_group, mesh.dp, mesh.dp_rank)
                     if par.zero == 1 and mesh.dp > 1 else None)
        self.grad_buckets: GradBuckets | None = None
        if mesh.dp > 1 and par.dp_bucket_mb > 0:
            self.grad_buckets = self._make_buckets(par.dp_bucket_mb)
            self.executor.before_stage_done = self.grad_buckets.stage_starts_done
            self.executor.after_stage_done = self.grad_buckets.stage_done
        # Evaluation runs the training schedule's forwards alone, in the same order:
        # valid by construction (forwards depend only on forwards) on any placement.
        fwd = Schedule.build(
            "forward-only", self.num_microbatches, placement,
            {r: [p for p in self.schedule.parts(r) if p.kind is Kind.F] for r in self.schedule.actions},
        )
        self.eval_executor = Executor(
            lower(fwd), mesh.pp_rank, self.stages, self.p2p, train=False, meter=self.meter
        )
        self.eval_executor.threads = self._lent_threads(fwd)

    def _lent_threads(self, schedule: Schedule) -> dict[Action, int]:
        """This rank's actions that run on idle ranks' cores too (``par.lend_cores``, CPU only)."""
        if not self.par.lend_cores:
            return {}
        return lent_threads(schedule, self.mesh.pp_rank, self.device,
                            self.layout.world_size, compiled=self.par.compile)

    def _make_buckets(self, bucket_mb: float) -> GradBuckets:
        """Data-parallel buckets of this rank's parameters, each under the stage that finishes it."""
        # A parameter in two stages of this rank (a tied weight under ZB-V) is final only
        # after the later of the two; a tied copy on another rank is summed with it first,
        # after the step, so it stays out of the buckets and is averaged on its own.
        owner: dict[int, int] = {}
        params: dict[int, nn.Parameter] = {}
        for s in self._done_order:
            for _, p in self.stages[s].named_parameters():
                owner[id(p)] = s
                params[id(p)] = p
        if self.tied_group is not None and self._tied_param is not None:
            owner.pop(id(self._tied_param), None)
        by_stage: dict[int, list[nn.Parameter]] = {s: [] for s in self._done_order}
        for pid, s in owner.items():
            by_stage[s].append(params[pid])
        # under SP a stage's norm grads are summed over tp first, all at once: buckets wait
        return GradBuckets(by_stage, self.mesh.dp_group, self.mesh.dp, bucket_mb,
                           before_issue=self._reduce_sequence_parallel, zero=self.zero,
                           in_backward=not self.sequence_parallel)

    def _reduce_sequence_parallel(self, stage: int) -> None:
        """Sum over tp the grads of ``stage``'s params that saw only a sequence shard."""
        if self.sequence_parallel:
            for block in self.stages[stage].blocks.values():
                reduce_sequence_parallel_grads(block, self.tp_group)

    def _make_p2p(self, lowered: Schedule, timeout_s: float, emulate: bool) -> P2P:
        """Point-to-point groups for every link the schedule uses, warmed up collectively."""
        return connect(self.mesh, lowered, self.device, timeout_s, emulate)

    def _tie(self, emb_rank: int, head_rank: int) -> None:
        first = self.stages.get(0)
        last = self.stages.get(self.schedule.num_stages - 1)
        if emb_rank == head_rank:
            if first is not None and last is not None:
                tie_weights(next(iter(first.blocks.values())), next(reversed(last.blocks.values())))
            return
        # Two copies, initialised equal; summing their grads keeps them equal under any
        # elementwise optimizer, exactly as one shared weight would train.
        self.tied_group = self.mesh.pipeline_pair_group(emb_rank, head_rank)
        if first is not None:
            emb = next(iter(first.blocks.values()))
            self._tied_param = emb.get_parameter(type(emb).tied_param_name)
        elif last is not None:
            head = next(reversed(last.blocks.values()))
            self._tied_param = head.get_parameter(type(head).tied_param_name)

    # -- parameters ------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their single-process names, each once.

        Under tensor parallelism these are this tp rank's *shards* (what the optimizer
        steps); ``full_named_parameters`` gives the logical tensors. A tied weight whose
        embedding and head stages share this rank (ZB-V) is one Parameter in two
        stages; the optimizer must see it once.
        """
        seen: set[int] = set()
        for stage in self.stages.values():
            for name, p in stage.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters (for the optimizer)."""
        return [p for _, p in self.named_parameters()]

    def to_full(self, name: str, local: Tensor) -> Tensor:
        """The logical tensor of ``local``, shaped like this rank's parameter ``name``.

        Works for the parameter itself, its grad or optimizer state. A collective call
        over the tp group for sharded names: every tp rank must ask for the same names
        in the same order. Replicated names come back as a detached copy.
        """
        owner = self._owners.get(name)
        if owner is None:
            return local.detach().clone()
        layer, local_name = owner
        return layer.full_of(local_name, local)

    def to_shard(self, name: str, full: Tensor) -> Tensor:
        """This tp rank's part of ``full``, a logical tensor of parameter ``name`` (local)."""
        owner = self._owners.get(name)
        if owner is None:
            return full
        layer, local_name = owner
        return layer.shard_of(local_name, full)

    def full_named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The logical (unsharded) parameters of this rank's stages, detached, by name.

        Collective over the tp group (every tp rank iterates in step); at tp=1 these
        are detached copies of ``named_parameters``.
        """
        for name, p in self.named_parameters():
            yield name, self.to_full(name, p)

    def tied_duplicate(self) -> nn.Parameter | None:
        """The head's copy of a tied embedding split across ranks, on the head's rank; else None.

        It always equals the embedding's copy (their grads are summed before any update),
        so a global grad norm or a checkpoint counts it once, through the embedding.
        """
        if self.tied_group is None or 0 in self.stages:
            return None
        return self._tied_param

    def zero_grad(self) -> None:
        """Drop all gradients (and the ZeRO-1 chunks' ones)."""
        for p in self.parameters():
            p.grad = None
        if self.zero is not None:
            self.zero.zero_grad()

    # -- steps -----------------------------------------------------------------------

    def _microbatches(self, tokens: Inputs, targets: Targets | None
                      ) -> tuple[list[Any], list[Any]]:
        """This replica's microbatches; sets the boundary shapes they imply (targets None:
        prediction, the last stage keeps the head's outputs)."""
        self._check_batch(tokens, targets)
        dp, m = self.mesh.dp, self.num_microbatches

        def split_one(t: Tensor) -> list[Tensor]:
            shard = t.chunk(dp)[self.mesh.dp_rank]
            return [c.to(self.device, non_blocking=True) for c in shard.chunk(m)]

        def split(x: Inputs) -> list[Any]:
            if isinstance(x, Tensor):
                return split_one(x)
            parts = {k: split_one(t) for k, t in x.items()}
            return [{k: p[i] for k, p in parts.items()} for i in range(m)]

        mbs_in = split(tokens)
        mbs_tgt = split(targets) if targets is not None else [None] * m
        # every replica divides by its share of the global count: averaged over dp, the
        # grads and the loss are the global batch's sums over its global target count
        denominators = {k: max(c, 1) / dp for k, c in
                        (target_counts(targets) if targets is not None else {}).items()}
        last = self.stages.get(self.schedule.num_stages - 1)
        if last is not None:
            last.denominators = denominators
        first = mbs_in[0]
        shapes = ({"tokens": tuple(first.shape)} if isinstance(first, Tensor)
                  else {k: tuple(t.shape) for k, t in first.items()})
        bounds = self.partition.bounds
        signatures: dict[int, Signature] = {}
        family = family_of(self.model_cfg)

        def signature(boundary: int) -> Signature:
            if boundary not in signatures:
                last_block = bounds[boundary][1] - 1
                signatures[boundary] = family.signature(
                    self.model_cfg, shapes, last_block, tp=self.mesh.tp,
                    sequence_parallel=self.sequence_parallel,
                )
            return signatures[boundary]

        self.p2p.signature = signature
        return mbs_in, mbs_tgt

    def _check_batch(self, tokens: Inputs, targets: Targets | None) -> None:
        dp, m = self.mesh.dp, self.num_microbatches
        if targets is None and isinstance(tokens, Tensor):
            targets = tokens  # prediction: no targets, the same checks of the tokens
        if not isinstance(tokens, Tensor) or not isinstance(targets, Tensor):
            self._check_named_batch(tokens, targets)
            return
        if tokens.dim() != 2 or tokens.shape != targets.shape:
            raise BatchError(
                f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must both be "
                "(batch, sequence) of the same shape"
            )
        if tokens.dtype != torch.long or targets.dtype != torch.long:
            raise BatchError(f"tokens and targets must be int64 ids, got {tokens.dtype} and "
                             f"{targets.dtype}")
        n, seq = tokens.shape
        if n == 0 or n % (dp * m):
            raise BatchError(
                f"batch of {n} sequences does not split evenly into dp={dp} x microbatches={m}; "
                f"use a batch size that is a multiple of {dp * m}"
            )
        if seq > self.model_cfg.max_seq_len:
            raise BatchError(f"sequence length {seq} exceeds max_seq_len="
                             f"{self.model_cfg.max_seq_len}; use shorter sequences")
        if self.sequence_parallel and seq % self.mesh.tp:
            raise BatchError(f"sequence length {seq} does not split over tp={self.mesh.tp} "
                             f"(sequence parallelism); use a multiple of {self.mesh.tp}")

    def _check_named_batch(self, inputs: Inputs, targets: Targets | None) -> None:
        """Named inputs and targets: one batch size, splitting into dp x microbatches."""
        named = {**_named(inputs, "inputs"),
                 **(_named(targets, "targets") if targets is not None else {})}
        sizes = {name: t.shape[0] if t.dim() else 0 for name, t in named.items()}
        n = next(iter(sizes.values()), 0)
        dp, m = self.mesh.dp, self.num_microbatches
        if len(set(sizes.values())) != 1:
            raise BatchError(f"inputs and targets hold different batch sizes {sizes}; every "
                             "tensor's first dim is the batch")
        if n == 0 or n % (dp * m):
            raise BatchError(
                f"batch of {n} sequences does not split evenly into dp={dp} x microbatches={m}; "
                f"use a batch size that is a multiple of {dp * m}"
            )
        long = [name for name, t in named.items()
                if t.dim() == 2 and t.shape[1] > self.model_cfg.max_seq_len]
        if long:
            raise BatchError(f"{long} are longer than max_seq_len={self.model_cfg.max_seq_len}; "
                             "use shorter sequences")

    def train_step(self, tokens: Inputs, targets: Targets) -> float:
        """Forward and backward of the global batch; grads accumulate; returns the batch loss.

        Grads from earlier steps (no ``zero_grad`` between calls) are set aside while this
        step runs, so the sums across ranks (tied copies, data-parallel replicas) cover
        this step's grads alone; a failed step puts them back untouched. Under ZeRO-1 the
        step's averaged grads land in ``self.zero``'s chunks (added to what they hold),
        and the parameters' own ``.grad`` is dropped.
        """
        mbs_in, mbs_tgt = self._microbatches(tokens, targets)
        params = self.parameters()
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            self.executor.run(StepInputs(mbs_in, mbs_tgt))
        except BaseException:
            if self.grad_buckets is not None:
                self.grad_buckets.reset()
            for p, g in zip(params, earlier, strict=True):
                p.grad = g
            raise
        self._reduce_grads()
        for p, g in zip(params, earlier, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)
        return self._reduce_loss()

    @torch.no_grad()
    def eval_step(self, tokens: Inputs, targets: Targets) -> float:
        """Forward-only loss of a batch (no grads, nothing stashed), known to every rank."""
        mbs_in, mbs_tgt = self._microbatches(tokens, targets)
        self.eval_executor.run(StepInputs(mbs_in, mbs_tgt))
        return self._reduce_loss()

    @torch.no_grad()
    def predict_step(self, inputs: Inputs, reduce: Callable[[Any], Tensor] | None = None
                     ) -> Tensor:
        """The head's outputs for a batch (forward only, no targets), known to every rank.

        The last stage runs the head on each microbatch, applies ``reduce`` to its outputs
        (row-wise: softmax, argmax, picking one of a head's named outputs; less to send),
        concatenates them (this replica's share of the batch) and hands the result to the
        other stages of its pipeline
        (a broadcast over the pp group); the replicas' shares are gathered in order over dp.
        """
        mbs_in, mbs_tgt = self._microbatches(inputs, None)
        self.eval_executor.run(StepInputs(mbs_in, mbs_tgt))
        last_stage = self.schedule.num_stages - 1
        result: Tensor | None = None
        last = self.stages.get(last_stage)
        if last is not None:
            outs, last.outputs = last.outputs, {}
            result = torch.cat([(reduce(outs[mb]) if reduce is not None else outs[mb]).cpu()
                                for mb in sorted(outs)])
        if self.mesh.pp > 1:
            box = [result]
            src = self.mesh.pp_ranks[self.schedule.placement.rank_of(last_stage)]
            dist.broadcast_object_list(box, src=src, group=self.mesh.pp_group)
            result = box[0]
        if self.mesh.dp > 1:
            parts: list[Any] = [None] * self.mesh.dp
            dist.all_gather_object(parts, result, group=self.mesh.dp_group)
            result = torch.cat(parts)
        assert result is not None
        return result

    def _reduce_grads(self) -> None:
        if self.grad_buckets is not None:
            # most buckets went out during the step (with their stage's SP sums); wait
            self.grad_buckets.finish(self._done_order)
        else:  # norms (and row biases) saw only this rank's positions
            for s in self.stages:
                self._reduce_sequence_parallel(s)
        if self.tied_group is not None and self._tied_param is not None:
            grad = self._tied_param.grad
            if grad is None:  # a stage whose copy got no grad still joins the sum
                grad = self._tied_param.grad = torch.zeros_like(self._tied_param)
            dist.all_reduce(grad, group=self.tied_group)
        if self.mesh.dp > 1:
            rest = self.parameters() if self.grad_buckets is None else (
                [self._tied_param] if self.tied_group is not None and self._tied_param is not None
                else [])
            if self.zero is not None:
                self.zero.reduce_scatter_grads(rest)
                return
            for p in rest:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.mesh.dp_group)
                p.grad.div_(self.mesh.dp)

    def _reduce_loss(self) -> float:
        """Sum of the last stage's microbatch losses, made known to every rank."""
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        last = self.stages.get(self.schedule.num_stages - 1)
        if last is not None:
            for loss in last.take_losses():
                total += loss.float()
        if self.mesh.pp > 1:
            dist.all_reduce(total, group=self.mesh.pp_group)
        if self.mesh.dp > 1:
            dist.all_reduce(total, group=self.mesh.dp_group)
            total /= self.mesh.dp
        return float(total)

    def peak_stashed_bytes(self) -> int:
        """Most bytes of activations this rank's stages held for backward at once."""
        return self.meter.peak_by.get("stash", 0)

    def peak_activation_bytes(self) -> int:
        """Most bytes held at once for backward and in boundary sends not yet delivered."""
        return self.meter.peak
