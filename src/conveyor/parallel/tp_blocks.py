"""Tensor-parallel blocks: every block is built at full size from its own seed, then sliced.

So a tp rank's shard holds exactly the rows/columns of the single-process weights
(tp=1 and tp=N start bit-identical), and the blocks themselves never branch on tp.
What gets split is read off the layers, not off family names:

- a layer with a ``tp_plan`` (attention, the MLPs) gets column-parallel linears
  where the plan says ``column`` and row-parallel ones where it says ``row``; the
  layer enters the tp region once (a forward pre-hook: copy, or all-gather the
  sequence under SP), so q/k/v or gate/up share one backward all-reduce. Attention's
  fused qkv rows are taken in shard order (each rank: its q, k and v heads), and its
  head counts become the rank's;
- the embedding block's token table (a block with role ``embedding``, any family)
  becomes vocabulary-parallel (vocabulary padded to a multiple of tp); the head
  block's projection becomes column-parallel over the same padded rows, and its
  criterion vocabulary-parallel cross-entropy; a relative position bias keeps its
  heads' columns;
- norms and everything else stay replicated. Under sequence parallelism (SP) the
  norms see a sequence shard, so their grads are marked to be summed over tp.

Parameters keep their single-process names; each carries ``tp_shard_dim``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.config import ConfigError, ModelConfig
from conveyor.models import build_blocks
from conveyor.models.attention import RelativePositionBias
from conveyor.models.families import family_of
from conveyor.models.layers import Attention
from conveyor.parallel.collectives import Group, split_seq, tp_size
from conveyor.parallel.sharded import TensorParallel, mark_shard
from conveyor.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    qkv_row_order,
    shard_heads,
    to_tp_region,
)
from conveyor.parallel.vocab import VocabParallelEmbedding, VocabParallelLMLoss

__all__ = ["check_tensor_parallel", "shard_block", "build_tp_blocks", "tp_owners"]


def check_tensor_parallel(
    cfg: ModelConfig, tp: int, *, sequence_parallel: bool = False, seq_len: int | None = None
) -> None:
    """Raise ConfigError naming the value and the fix if ``cfg`` cannot be split over ``tp``."""
    if tp == 1:
        return
    if sequence_parallel and not family_of(cfg).sequence_parallel:
        raise ConfigError(f"sequence parallelism is not supported for family={cfg.family!r} "
                          "yet (its boundaries carry whole sequences); drop sequence_parallel")
    shard_heads(cfg.n_heads, cfg.kv_heads, cfg.head_dim, tp)  # heads and kv heads
    if cfg.ffn_dim % tp:
        raise ConfigError(
            f"the MLP width d_ff={cfg.ffn_dim} is not divisible by tp={tp}; "
            f"set d_ff to a multiple of {tp}"
        )
    seq = cfg.max_seq_len if seq_len is None else seq_len
    if sequence_parallel and seq % tp:
        raise ConfigError(
            f"sequence_parallel splits the sequence over tp={tp}, but the sequence length "
            f"{seq} is not a multiple of it; use a seq_len divisible by {tp}"
        )


class _EnterRegion:
    """Forward pre-hook: the layer's input enters the tp region (copy, or gather the sequence)."""

    def __init__(self, group: Group, sequence_parallel: bool) -> None:
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # every float input: a cross-attention's memory enters too (its grad is summed)
        return tuple(to_tp_region(a, self.group, self.sequence_parallel)
                     if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


class _SplitPositions:
    """Forward hook on a position table: keep this rank's positions (SP), all-gather the grad."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        return split_seq(out, self.group, dim=0)  # (T, D) -> (T/tp, D)


class HeadShardedTable(TensorParallel):
    """A (rows, heads) lookup table split over tp by its columns: each rank its own heads'."""

    def __init__(self, rows: int, heads: int, *, group: Group = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(rows, heads // tp_size(group), device=device))
        mark_shard(self.weight, 1)

    @classmethod
    def from_full(cls, weight: Tensor, group: Group = None) -> HeadShardedTable:
        """This rank's columns of the logical table (rows, heads)."""
        layer = cls(weight.shape[0], weight.shape[1], group=group, device="meta")
        layer._adopt({"weight": weight})
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        """Ids (...) -> (..., heads / tp)."""
        return F.embedding(ids, self.weight)


def _shard_planned(module: nn.Module, group: Group, sp: bool) -> None:
    plan: dict[str, str] = type(module).tp_plan  # type: ignore[attr-defined]
    row_orders: dict[str, Tensor] = {}
    tp = tp_size(group)
    if isinstance(module, Attention):
        heads = shard_heads(module.n_heads, module.kv_heads, module.head_dim, tp)
        row_orders["qkv"] = qkv_row_order(module.n_heads, module.kv_heads, module.head_dim, tp)
        module.n_heads, module.kv_heads = heads.n_heads, heads.kv_heads
    elif hasattr(module, "shard_heads"):  # a layer that keeps its heads' rows itself
        row_orders = module.shard_heads(tp)
    for name, how in plan.items():
        plain = getattr(module, name)
        layer: nn.Module
        if how == "column":
            order = row_orders.get(name)
            layer = ColumnParallelLinear.from_full(
                plain.weight, plain.bias, group, row_order=order, input_is_prepared=True,
                sequence_parallel=sp,
            )
        elif how == "row":
            layer = RowParallelLinear.from_full(plain.weight, plain.bias, group,
                                                sequence_parallel=sp)
        else:
            raise ValueError(f"{type(module).__name__}.tp_plan[{name!r}]={how!r}; use 'column' "
                             "or 'row'")
        setattr(module, name, layer)
    module.register_forward_pre_hook(_EnterRegion(group, sp))


def shard_block(
    block: nn.Module, cfg: ModelConfig, group: Group, *, sequence_parallel: bool = False
) -> nn.Module:
    """Slice a full-size block of ``cfg`` into this rank's tensor-parallel shard, in place."""
    if tp_size(group) == 1:
        return block
    check_tensor_parallel(cfg, tp_size(group))
    sp = sequence_parallel
    for module in list(block.modules()):  # a snapshot: children are replaced below
        role = getattr(module, "role", None)  # every family's token table and vocab head
        if role == "embedding":
            module.tok = VocabParallelEmbedding.from_full(module.tok.weight, group,
                                                          sequence_parallel=sp)
            if sp and getattr(module, "pos", None) is not None:
                module.pos.register_forward_hook(_SplitPositions(group))
        elif role == "head" and hasattr(module, "proj"):  # a classifier head stays whole
            module.proj = ColumnParallelLinear.from_full(
                module.proj.weight, module.proj.bias, group, pad_out=True, sequence_parallel=sp
            )
            module.criterion = VocabParallelLMLoss(group, cfg.vocab_size)
        elif isinstance(module, RelativePositionBias):
            module.table = HeadShardedTable.from_full(module.table.weight, group)
        elif hasattr(type(module), "tp_plan"):
            _shard_planned(module, group, sp)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            for p in module.parameters(recurse=False):
                mark_shard(p, None, sequence_parallel=sp)  # sees a sequence shard under SP
    for p in block.parameters():
        if not hasattr(p, "tp_shard_dim"):
            mark_shard(p, None)  # replicated, its grad whole (learned positions)
    return block


def build_tp_blocks(
    cfg: ModelConfig, seed: int, indices: list[int], group: Group, *,
    sequence_parallel: bool = False,
) -> list[nn.Module]:
    """Blocks ``indices`` as this tp rank's shards (tied embedding and head share rows)."""
    shard = partial(shard_block, cfg=cfg, group=group, sequence_parallel=sequence_parallel)
    return build_blocks(cfg, seed, indices, transform=shard)


def tp_owners(module: nn.Module, prefix: str = "") -> dict[str, tuple[TensorParallel, str]]:
    """Every sharded parameter's name -> (its tensor-parallel layer, its name in the layer)."""
    out: dict[str, tuple[TensorParallel, str]] = {}
    for path, m in module.named_modules():
        if isinstance(m, TensorParallel):
            dot = f"{prefix}{path}." if path else prefix
            for name, _ in m.named_parameters(recurse=False):
                out[dot + name] = (m, name)
    return out
