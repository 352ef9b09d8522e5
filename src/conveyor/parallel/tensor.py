"""Megatron-style tensor-parallel layers: column/row linears, vocab-parallel embedding and loss.

A column-parallel linear splits its weight by output rows and a row-parallel one by
input columns, so ``column -> elementwise -> row`` needs one all-reduce forward (after
the row layer) and one backward (before the column layer). The collectives live in
:mod:`conveyor.parallel.collectives`; the layers only place them.

Every parameter is a shard of a logical (unsharded) tensor and carries
``tp_shard_dim`` (the dim it is split along, None when replicated). Layers are built
*from* the logical tensors (``from_full``), so tp=1 and tp=N start bit-identical, and
give them back (``full_parameters``) under the plain layer's names, for checkpoints.

The linears subclass :class:`conveyor.models.linear.Linear`: their collectives act on
activations, so they run in the input-grad (B) path, while the local weight-grad
matmul is deferred to a ``WeightGradStore`` exactly as in the plain layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.config import ConfigError

# _DeferredWeightGradLinear: the plain Linear's deferred-weight-grad matmul, reused so a
# row-parallel layer can add its bias after the reduce (linear.py has no bias-less entry)
from conveyor.models.linear import Linear, _DeferredWeightGradLinear
from conveyor.parallel.collectives import (
    Group,
    all_gather,
    all_reduce,
    copy_to_tp,
    gather_last,
    gather_seq,
    reduce_from_tp,
    reduce_scatter_seq,
    split_last,
    tp_rank,
    tp_size,
)

__all__ = [
    "TensorParallel",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "HeadShard",
    "shard_heads",
    "qkv_row_order",
    "padded_size",
    "shard",
    "gather_full",
    "full_state_dict",
    "load_full_state_dict",
    "to_tp_region",
    "reduce_sequence_parallel_grads",
]


def padded_size(size: int, tp: int) -> int:
    """``size`` rounded up to a multiple of ``tp`` (a vocabulary split over tp ranks)."""
    return -(-size // tp) * tp


def shard(full: Tensor, shard_dim: int | None, group: Group) -> Tensor:
    """This rank's contiguous chunk of ``full`` along ``shard_dim`` (a copy; None: all of it)."""
    world = tp_size(group)
    if shard_dim is None or world == 1:
        return full.detach().clone()
    if full.shape[shard_dim] % world:
        raise ValueError(
            f"dim {shard_dim} of size {full.shape[shard_dim]} does not split over tp={world}; "
            f"make it a multiple of {world} (pad vocabularies, see padded_size)"
        )
    return full.detach().chunk(world, dim=shard_dim)[tp_rank(group)].clone()


def gather_full(param: Tensor, shard_dim: int | None, group: Group) -> Tensor:
    """The logical tensor whose shard ``param`` is (collective call on every tp rank)."""
    if shard_dim is None:
        return param.detach().clone()
    # a fresh buffer already: contiguous() copies only when the gather was not along dim 0
    return all_gather(param.detach(), shard_dim, group, "state").contiguous()


def _mark(param: Tensor | None, shard_dim: int | None, sequence_parallel: bool = False) -> None:
    if param is not None:
        param.tp_shard_dim = shard_dim  # type: ignore[attr-defined]
        # under SP a replicated param sees only this rank's tokens: its grad is partial
        partial = sequence_parallel and shard_dim is None
        param.sequence_parallel = partial  # type: ignore[attr-defined]


def to_tp_region(x: Tensor, group: Group, sequence_parallel: bool = False) -> Tensor:
    """Enter a tp region once for several column layers (copy, or all-gather the sequence)."""
    return gather_seq(x, group) if sequence_parallel else copy_to_tp(x, group)


def _linear(layer: Linear, x: Tensor, bias: Tensor | None) -> Tensor:
    store = layer.weight_grad_store
    if store is None or not torch.is_grad_enabled():
        return F.linear(x, layer.weight, bias)
    return _DeferredWeightGradLinear.apply(x, layer.weight, bias, store)


def _check_divides(what: str, size: int, group: Group, fix: str) -> int:
    world = tp_size(group)
    if size % world:
        raise ValueError(f"{what}={size} is not divisible by tp={world}; {fix}")
    return world


class TensorParallel(nn.Module):
    """A layer whose parameters are shards of logical tensors named as in the plain layer."""

    group: Group

    def _to_shard(self, name: str, full: Tensor) -> Tensor:
        return shard(full, getattr(self, name).tp_shard_dim, self.group)

    def _to_full(self, name: str, local: Tensor) -> Tensor:
        return gather_full(local, getattr(self, name).tp_shard_dim, self.group)

    def shard_parameters(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's shards of the logical tensors ``full``, by local name (no collective)."""
        names = [n for n, _ in self.named_parameters(recurse=False) if n in full]
        return {n: self._to_shard(n, full[n]) for n in names}

    def full_parameters(self) -> dict[str, Tensor]:
        """The logical tensors, by local name (collective call on every tp rank)."""
        return {n: self._to_full(n, p) for n, p in self.named_parameters(recurse=False)}

    def full_grads(self) -> dict[str, Tensor]:
        """The logical grads, by local name (collective call on every tp rank)."""
        params = self.named_parameters(recurse=False)
        return {n: self._to_full(n, p.grad) for n, p in params if p.grad is not None}

    def full_weight(self) -> Tensor:
        """The logical weight (collective call on every tp rank)."""
        return self.full_parameters()["weight"]

    def _adopt(self, full: Mapping[str, Tensor]) -> None:
        # replace the (meta) parameters by shards of ``full``, keeping their tp marks
        for name, local in self.shard_parameters(full).items():
            old = getattr(self, name)
            param = nn.Parameter(local, requires_grad=old.requires_grad)
            param.__dict__.update(old.__dict__)  # tp_shard_dim, sequence_parallel
            setattr(self, name, param)


class ColumnParallelLinear(Linear, TensorParallel):
    """``Linear`` with its output features (weight rows) split over the tp ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Group = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        input_is_prepared: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        fix = "pad it (from_full(..., pad_out=True))"
        world = _check_divides("out_features", out_features, group, fix)
        super().__init__(in_features, out_features // world, bias, device=device, dtype=dtype)
        self.group = group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        # True when the caller ran to_tp_region itself, once for several layers (q/k/v,
        # SwiGLU's gate and up), so the input grad is all-reduced once, not per layer
        self.input_is_prepared = input_is_prepared
        self.full_out_features = out_features
        self.logical_out_features = out_features  # without vocabulary padding
        self.row_order: Tensor | None = None  # logical rows in shard order (fused qkv)
        _mark(self.weight, 0)
        _mark(self.bias, 0)

    @classmethod
    def from_full(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        group: Group = None,
        *,
        row_order: Tensor | None = None,
        pad_out: bool = False,
        **kwargs: Any,
    ) -> ColumnParallelLinear:
        """This rank's layer from the logical weight (out, in), rows taken in ``row_order``.

        ``pad_out`` appends zero rows up to a multiple of tp (an LM head over a padded
        vocabulary); ``full_parameters`` drops them again.
        """
        rows = weight.shape[0]
        out = padded_size(rows, tp_size(group)) if pad_out else rows
        layer = cls(weight.shape[1], out, bias is not None, group=group, device="meta", **kwargs)
        layer.logical_out_features = rows
        layer.row_order = None if row_order is None else row_order.detach().cpu().clone()
        layer._adopt({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
        return layer

    def _to_shard(self, name: str, full: Tensor) -> Tensor:
        if self.row_order is not None:
            full = full[self.row_order.to(full.device)]
        pad = self.full_out_features - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros((pad, *full.shape[1:]))])
        return shard(full, 0, self.group)

    def _to_full(self, name: str, local: Tensor) -> Tensor:
        full = gather_full(local, 0, self.group)[: self.logical_out_features]
        if self.row_order is None:
            return full
        logical = torch.empty_like(full)
        logical[self.row_order.to(full.device)] = full  # full[i] is logical row row_order[i]
        return logical

    def forward(self, x: Tensor) -> Tensor:
        """Replicated x (B, T, in) (a sequence shard with SP) -> this rank's output features."""
        if not self.input_is_prepared:
            x = to_tp_region(x, self.group, self.sequence_parallel)
        y = super().forward(x)  # the plain Linear: weight-grad deferred when a store is set
        return gather_last(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        """Shape of the shard and of the logical layer."""
        tp = tp_size(self.group)
        return f"{super().extra_repr()}, full_out_features={self.full_out_features}, tp={tp}"


class RowParallelLinear(Linear, TensorParallel):
    """``Linear`` with its input features (weight columns) split; output summed over tp."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Group = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        fix = "choose a width that tp divides"
        world = _check_divides("in_features", in_features, group, fix)
        super().__init__(in_features // world, out_features, bias, device=device, dtype=dtype)
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.full_in_features = in_features
        _mark(self.weight, 1)
        _mark(self.bias, None, sequence_parallel)

    @classmethod
    def from_full(
        cls, weight: Tensor, bias: Tensor | None = None, group: Group = None, **kwargs: Any
    ) -> RowParallelLinear:
        """This rank's layer from the logical weight (out, in) and bias (out,)."""
        out, in_ = weight.shape
        layer = cls(in_, out, bias is not None, group=group, device="meta", **kwargs)
        layer._adopt({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """This rank's input features (B, T, in/tp) -> (B, T, out) summed (or a sequence shard)."""
        if tp_size(self.group) == 1:
            return super().forward(x)  # exactly the plain Linear
        if not self.input_is_parallel:
            x = split_last(x, self.group)
        y = _linear(self, x, None)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group)
        else:
            y = reduce_from_tp(y, self.group)
        # the bias once, after the sum: added before it, tp ranks would add it tp times
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        """Shape of the shard and of the logical layer."""
        tp = tp_size(self.group)
        return f"{super().extra_repr()}, full_in_features={self.full_in_features}, tp={tp}"


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
        _mark(self.weight, 0)
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


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one tp rank holds (the same count on every rank)."""

    n_heads: int
    """Query heads on this rank."""
    kv_heads: int
    """Key/value heads on this rank."""
    head_dim: int
    tp: int

    @property
    def qkv_widths(self) -> list[int]:
        """Widths of q, k and v in this rank's fused qkv output, for ``split``."""
        kv = self.kv_heads * self.head_dim
        return [self.n_heads * self.head_dim, kv, kv]


def shard_heads(n_heads: int, n_kv_heads: int, head_dim: int, tp: int) -> HeadShard:
    """Split the heads over ``tp`` ranks; query head h keeps its kv head (h // groups)."""
    if n_heads % tp:
        raise ConfigError(
            f"n_heads={n_heads} is not divisible by tp={tp}; choose tp dividing n_heads"
        )
    if n_kv_heads % tp:
        raise ConfigError(
            f"n_kv_heads={n_kv_heads} is not divisible by tp={tp}; choose tp dividing "
            "n_kv_heads or more kv heads"
        )
    # contiguous blocks line up: rank r's queries [r*n/tp, ...) read kv heads [r*kv/tp, ...)
    return HeadShard(n_heads // tp, n_kv_heads // tp, head_dim, tp)


def qkv_row_order(n_heads: int, n_kv_heads: int, head_dim: int, tp: int) -> Tensor:
    """Rows of a fused [q; k; v] weight in shard order: rank r's chunk is its [q_r; k_r; v_r].

    A naive split of the fused rows would give rank 0 all of q and rank 1 k and v;
    pass this as ``ColumnParallelLinear.from_full(..., row_order=...)``.
    """
    heads = shard_heads(n_heads, n_kv_heads, head_dim, tp)
    q, kv = heads.n_heads * head_dim, heads.kv_heads * head_dim
    k0, v0 = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    blocks = []
    for r in range(tp):
        blocks += [
            torch.arange(r * q, (r + 1) * q),
            torch.arange(k0 + r * kv, k0 + (r + 1) * kv),
            torch.arange(v0 + r * kv, v0 + (r + 1) * kv),
        ]
    return torch.cat(blocks)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every shard replaced by its logical tensor (collective)."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for prefix, m in module.named_modules():
        if isinstance(m, TensorParallel):
            for name, tensor in m.full_parameters().items():
                state[f"{prefix}.{name}" if prefix else name] = tensor
    return state


def load_full_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Load logical tensors (as ``full_state_dict`` gives) into a sharded ``module``."""
    local = dict(state)
    for prefix, m in module.named_modules():
        if isinstance(m, TensorParallel):
            dot = f"{prefix}." if prefix else ""
            full = {
                k[len(dot) :]: v
                for k, v in state.items()
                if k.startswith(dot) and "." not in k[len(dot) :]
            }
            local.update({dot + k: v for k, v in m.shard_parameters(full).items()})
    module.load_state_dict(local, strict=strict)


def reduce_sequence_parallel_grads(module: nn.Module, group: Group) -> None:
    """Sum over tp the grads of replicated params that saw only a sequence shard (SP).

    Call after backward (and after the weight-grad flush). Marks come from the layers
    here (row biases); mark others (norm gains) with ``param.sequence_parallel = True``.
    """
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            all_reduce(param.grad, group, "grad")
