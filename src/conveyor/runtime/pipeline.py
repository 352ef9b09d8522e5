"""A rank's whole share of a pipeline-parallel model: stages, schedule, communication.

``Pipeline`` builds only this rank's blocks (every block is initialised from its
own seed, so the pieces equal the single-process model), runs one step of any
schedule through the executor, and makes the distributed pieces add up: tied
embedding grads summed across the two stages holding them, grads averaged over
data-parallel replicas, the loss reduced onto every rank. The optimizer stays
outside: it sees this rank's parameters like any other module's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig, ParallelConfig
from ..memory import ActivationMeter
from ..models import EmbeddingBlock, HeadBlock, block_param_counts, build_blocks, tie_weights
from ..parallel.mesh import Mesh
from ..parallel.partition import Partition, by_params, uniform
from ..schedules import Kind, Schedule, lower, validate
from .comm import P2P
from .executor import Executor, StepInputs
from .stage import StageRunner

__all__ = ["Pipeline", "make_partition"]


def make_partition(model: ModelConfig, par: ParallelConfig, num_stages: int) -> Partition:
    """Blocks -> stages as the parallel config asks."""
    if par.partition == "params":
        return by_params(block_param_counts(model), num_stages)
    return uniform(model.num_blocks, num_stages)


class Pipeline:
    """This rank's stages of the model and the machinery to train them with a schedule."""

    def __init__(
        self,
        model: ModelConfig,
        par: ParallelConfig,
        mesh: Mesh,
        *,
        seed: int = 0,
        schedule: Schedule | None = None,
        device: torch.device | None = None,
        timeout_s: float = 300.0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model_cfg = model
        self.par = par
        self.mesh = mesh
        self.device = device or torch.device("cpu")
        self.schedule = schedule or par.make_schedule()
        self.stats = validate(self.schedule)
        self.num_microbatches = self.schedule.num_microbatches
        placement = self.schedule.placement
        self.partition = make_partition(model, par, self.schedule.num_stages)
        my_stages = placement.stages_of(mesh.pp_rank)
        split = self.schedule.split_backward
        self.stages: dict[int, StageRunner] = {}
        self.meter = ActivationMeter()
        for s in my_stages:
            idx = list(self.partition.blocks_of(s))
            blocks = [b.to(self.device) for b in build_blocks(model, seed, idx)]
            self.stages[s] = StageRunner(
                s, dict(zip(idx, blocks, strict=True)),
                num_microbatches=self.num_microbatches, recompute=par.recompute,
                split_backward=split, autocast_dtype=autocast_dtype, meter=self.meter,
            )
        self.tied_group: dist.ProcessGroup | None = None
        self._tied_param: nn.Parameter | None = None
        if model.tie_embeddings:
            self._tie(placement.rank_of(0), placement.rank_of(self.schedule.num_stages - 1))
        stage_ranks = [mesh.pp_ranks[placement.rank_of(s)] for s in range(placement.num_stages)]
        p2p = P2P((mesh.pp_group, mesh.pp_grad_group), stage_ranks, placement.num_stages,
                  self.device, timeout_s)
        self.p2p = p2p
        batched = dist.get_backend(mesh.pp_group) == "nccl"
        self.executor = Executor(
            lower(self.schedule), mesh.pp_rank, self.stages, p2p, batched_comm=batched
        )
        # Evaluation runs the training schedule's forwards alone, in the same order:
        # valid by construction (forwards depend only on forwards) on any placement.
        fwd = Schedule.build(
            "forward-only", self.num_microbatches, placement,
            {r: [a for a in acts if a.kind is Kind.F] for r, acts in self.schedule.actions.items()},
        )
        self.eval_executor = Executor(
            lower(fwd), mesh.pp_rank, self.stages, p2p, batched_comm=batched, train=False
        )

    def _tie(self, emb_rank: int, head_rank: int) -> None:
        first = self.stages.get(0)
        last = self.stages.get(self.schedule.num_stages - 1)
        if emb_rank == head_rank:
            if first is not None and last is not None:
                emb = next(iter(first.blocks.values()))
                head = next(reversed(last.blocks.values()))
                assert isinstance(emb, EmbeddingBlock) and isinstance(head, HeadBlock)
                tie_weights(emb, head)
            return
        # Two copies, initialised equal; summing their grads keeps them equal under any
        # elementwise optimizer, exactly as one shared weight would train.
        self.tied_group = self.mesh.pipeline_pair_group(emb_rank, head_rank)
        if first is not None:
            emb = next(iter(first.blocks.values()))
            self._tied_param = emb.get_parameter(EmbeddingBlock.tied_param_name)
        elif last is not None:
            head = next(reversed(last.blocks.values()))
            self._tied_param = head.get_parameter(HeadBlock.tied_param_name)

    # -- parameters ------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their single-process names, each once.

        A tied weight whose embedding and head stages share this rank (ZB-V) is one
        Parameter in two stages; the optimizer must see it once.
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

    def tied_duplicate(self) -> nn.Parameter | None:
        """The head's copy of a tied embedding split across ranks, on the head's rank; else None.

        It always equals the embedding's copy (their grads are summed before any update),
        so a global grad norm or a checkpoint counts it once, through the embedding.
        """
        if self.tied_group is None or 0 in self.stages:
            return None
        return self._tied_param

    def zero_grad(self) -> None:
        """Drop all gradients."""
        for p in self.parameters():
            p.grad = None

    # -- steps -----------------------------------------------------------------------

    def _microbatches(self, tokens: Tensor) -> list[Tensor]:
        shard = tokens.chunk(self.mesh.dp)[self.mesh.dp_rank]
        return [t.to(self.device, non_blocking=True) for t in shard.chunk(self.num_microbatches)]

    def train_step(self, tokens: Tensor, targets: Tensor) -> float:
        """Forward and backward of the global batch; grads accumulate; returns the batch loss."""
        mbs_in, mbs_tgt = self._microbatches(tokens), self._microbatches(targets)
        self.p2p.key = tuple(mbs_in[0].shape)
        self.executor.run(StepInputs(mbs_in, mbs_tgt))
        self._reduce_grads()
        return self._reduce_loss()

    @torch.no_grad()
    def eval_step(self, tokens: Tensor, targets: Tensor) -> float:
        """Forward-only loss of a batch (no grads, nothing stashed), known to every rank."""
        mbs_in, mbs_tgt = self._microbatches(tokens), self._microbatches(targets)
        self.p2p.key = tuple(mbs_in[0].shape)
        self.eval_executor.run(StepInputs(mbs_in, mbs_tgt))
        return self._reduce_loss()

    def _reduce_grads(self) -> None:
        if self.tied_group is not None and self._tied_param is not None:
            grad = self._tied_param.grad
            if grad is None:  # a stage whose copy got no grad still joins the sum
                grad = self._tied_param.grad = torch.zeros_like(self._tied_param)
            dist.all_reduce(grad, group=self.tied_group)
        if self.mesh.dp > 1:
            for p in self.parameters():
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
        return self.meter.peak
