"""Vocabulary-parallel embedding and cross-entropy: the full logits never sit on one rank.

The (padded) vocabulary is split over the tp ranks by rows: the embedding looks up
its own rows and the ranks' lookups are summed; the LM head (a column-parallel
linear over the same rows) gives each rank its columns of the logits, and the
cross-entropy exchanges only a max and two sums per token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.parallel.collectives import (
    Group,
    all_reduce,
    reduce_from_tp,
    reduce_scatter_seq,
    tp_rank,
    tp_size,
)
from conveyor.parallel.sharded import TensorParallel, gather_full, mark_shard, padded_size, shard

__all__ = ["VocabParallelEmbedding", "vocab_parallel_cross_entropy", "VocabParallelLMLoss"]


class VocabParallelEmbedding(TensorParallel):
    """``nn.Embedding`` whose (padded) vocabulary is split over the tp ranks.

    Ids outside this rank's rows look up zeros and the ranks' lookups are summed. Ids
    must lie in [0, num_embeddings): unlike ``nn.Embedding`` none is checked (a check
    would synchronise with the device).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: Group = None,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        world = tp_size(group)
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = padded_size(num_embeddings, world)
        self.rows = self.padded_num_embeddings // world
        self.start = tp_rank(group) * self.rows
        self.weight = nn.Parameter(
            torch.empty(self.rows, embedding_dim, device=device, dtype=dtype)
        )
        mark_shard(self.weight, 0)
        with torch.no_grad():
            self.weight.normal_()  # nn.Embedding's init; padded rows zero, never looked up
            self.weight[max(0, num_embeddings - self.start) :].zero_()

    @classmethod
    def from_full(
        cls, weight: Tensor, group: Group = None, **kwargs: Any
    ) -> VocabParallelEmbedding:
        """This rank's rows of the logical table (num_embeddings, dim), zero rows for padding."""
        layer = cls(weight.shape[0], weight.shape[1], group=group, device="meta", **kwargs)
        layer._adopt({"weight": weight})
        return layer

    def _to_shard(self, name: str, full: Tensor) -> Tensor:
        pad = full.new_zeros(self.padded_num_embeddings - full.shape[0], full.shape[1])
        return shard(torch.cat([full, pad]), 0, self.group)

    def _to_full(self, name: str, local: Tensor) -> Tensor:
        return gather_full(local, 0, self.group)[: self.num_embeddings]

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) -> (B, T, dim), replicated (a sequence shard with SP)."""
        outside = (ids < self.start) | (ids >= self.start + self.rows)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        """Shard and logical sizes."""
        tp = tp_size(self.group)
        return f"{self.rows}, {self.embedding_dim}, num_embeddings={self.num_embeddings}, tp={tp}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, targets: Tensor, group: Group, vocab_size: int, ignore: int
    ) -> tuple[Tensor, Tensor]:
        cols = logits.shape[-1]
        start = tp_rank(group) * cols
        real = min(max(vocab_size - start, 0), cols)  # columns of real (unpadded) tokens
        x = logits.float().reshape(-1, cols)
        t = targets.reshape(-1)
        if real < cols:  # padded vocabulary: out of the softmax
            x = x.clone()
            x[:, real:] = float("-inf")
        # the global max, a constant shift: it cancels in the loss, so no grad flows to it
        top = all_reduce(x.max(dim=-1).values, group, "fwd", dist.ReduceOp.MAX)
        shifted = x - top.unsqueeze(-1)
        counted = t != ignore
        mine = counted & (t >= start) & (t < start + real)
        local = (t - start).masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(mine, target_logit, 0.0)  # where(): 0 * -inf would be nan
        exp = shifted.exp_()
        # one all-reduce for both sums: each target logit lives on exactly one rank
        sums = all_reduce(torch.stack([target_logit, exp.sum(dim=-1)]), group, "fwd")
        losses = torch.where(counted, sums[1].log() - sums[0], 0.0)
        ctx.save_for_backward(exp.div_(sums[1].unsqueeze(-1)), local, mine, counted)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        count = counted.sum()
        ctx.mark_non_differentiable(count)
        return losses.sum(), count

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        softmax, local, mine, counted = ctx.saved_tensors
        # d(loss)/d(logit) = softmax - onehot(target), for counted tokens only
        scale = counted.to(softmax.dtype) * grad
        out = softmax * scale.unsqueeze(-1)
        rows = torch.arange(out.shape[0], device=out.device)
        out[rows, local] -= mine.to(out.dtype) * scale
        return out.reshape(ctx.shape).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    targets: Tensor,
    group: Group,
    vocab_size: int,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the count of counted targets, from this rank's vocab columns.

    ``logits_shard`` (..., V_padded/tp) holds this rank's columns; ``targets`` (...)
    holds ids in [0, vocab_size) or ``ignore_index``. Only the max and two sums per
    token cross the tp ranks, never the full logits; padded columns are out of the
    softmax. The mean is ``loss_sum / count``; divide by a global count instead when
    tokens are spread over microbatches or dp ranks. Computed in float32.
    """
    cols = logits_shard.shape[-1]
    if cols * tp_size(group) < vocab_size:
        raise ValueError(
            f"logits shard of {cols} columns x tp={tp_size(group)} cannot hold "
            f"vocab_size={vocab_size}; pass each rank's columns of the (padded) vocabulary"
        )
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits_shard.shape)} and targets {tuple(targets.shape)} do not "
            "match; targets must be the logits' shape without the vocabulary dim"
        )
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, group, vocab_size, ignore_index)


class VocabParallelLMLoss:
    """Summed cross-entropy from each rank's vocabulary columns (an LM head's criterion)."""

    def __init__(self, group: Group, vocab_size: int) -> None:
        self.group, self.vocab_size = group, vocab_size

    def __call__(self, logits_shard: Tensor, targets: Tensor) -> Tensor:
        """Logits (B, T, V_padded/tp) and targets (B, T) -> the sum over counted tokens, replicated.

        The pipeline divides it by the global batch's target count (``models.objective``).
        """
        loss_sum, _ = vocab_parallel_cross_entropy(logits_shard, targets, self.group, self.vocab_size)
        return loss_sum

    def __repr__(self) -> str:
        return f"VocabParallelLMLoss(vocab_size={self.vocab_size}, tp={tp_size(self.group)})"
