"""Megatron-style tensor-parallel linears and attention-head sharding.

A column-parallel linear splits its weight by output rows and a row-parallel one by
input columns, so ``column -> elementwise -> row`` needs one all-reduce forward (after
the row layer) and one backward (before the column layer). The collectives live in
:mod:`conveyor.parallel.collectives`; the layers only place them. The vocabulary-
parallel embedding and cross-entropy are in :mod:`conveyor.parallel.vocab`, the
shard bookkeeping every layer shares in :mod:`conveyor.parallel.sharded`; both are
re-exported here.

The linears subclass :class:`conveyor.models.linear.Linear`: their collectives act on
activations, so they run in the input-grad (B) path, while the local weight-grad
matmul is deferred to a ``WeightGradStore`` exactly as in the plain layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from conveyor.config import ConfigError
from conveyor.models.linear import Linear, linear
from conveyor.parallel.collectives import (
    Group,
    copy_to_tp,
    gather_last,
    gather_seq,
    reduce_from_tp,
    reduce_scatter_seq,
    split_last,
    tp_size,
)
from conveyor.parallel.sharded import (
    TensorParallel,
    check_divides,
    full_state_dict,
    gather_full,
    load_full_state_dict,
    mark_shard,
    padded_size,
    reduce_sequence_parallel_grads,
    shard,
)
from conveyor.parallel.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

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


def to_tp_region(x: Tensor, group: Group, sequence_parallel: bool = False) -> Tensor:
    """Enter a tp region once for several column layers (copy, or all-gather the sequence)."""
    return gather_seq(x, group) if sequence_parallel else copy_to_tp(x, group)

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
        world = check_divides("out_features", out_features, group, fix)
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
        mark_shard(self.weight, 0)
        mark_shard(self.bias, 0)

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
        world = check_divides("in_features", in_features, group, fix)
        super().__init__(in_features // world, out_features, bias, device=device, dtype=dtype)
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.full_in_features = in_features
        mark_shard(self.weight, 1)
        mark_shard(self.bias, None, sequence_parallel)

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
        y = linear(x, self.weight, None, self.weight_grad_store)
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
