"""Tensor-parallel collectives as tiny autograd functions (Megatron's ``mappings``).

Each function is the forward of one collective and the backward of its mirror::

    copy_to_tp          identity         | all-reduce      enter a tp region, x replicated
    reduce_from_tp      all-reduce       | identity        leave it: sum the partial outputs
    gather_seq          all-gather dim   | reduce-scatter  enter it from a sequence shard (SP)
    reduce_scatter_seq  reduce-scatter   | all-gather      leave it to a sequence shard (SP)
    split_seq           keep own chunk   | all-gather      replicated -> sequence shard
    split_last          keep own chunk   | all-gather      replicated -> last-dim shard
    gather_last         all-gather last  | keep own chunk  last-dim shard -> replicated

``group=None`` or a group of one rank makes every function the identity, so a layer
built on them is its plain torch counterpart at tp=1. :func:`count_collectives`
records every collective actually issued, for tests that count them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Group",
    "tp_size",
    "tp_rank",
    "count_collectives",
    "all_reduce",
    "all_gather",
    "copy_to_tp",
    "reduce_from_tp",
    "gather_seq",
    "reduce_scatter_seq",
    "split_seq",
    "split_last",
    "gather_last",
]

Group = dist.ProcessGroup | None

# torch 2.13 deprecates the *_tensor names in favour of *_single; torch 2.4 has only the former
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Open count_collectives() logs; every issued collective is appended to each of them
_logs: list[list[tuple[str, str]]] = []


def tp_size(group: Group) -> int:
    """Ranks in ``group``; 1 for None (no tensor parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    """This rank's index in ``group``; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


@contextmanager
def count_collectives() -> Iterator[list[tuple[str, str]]]:
    """Within this block, record ``(op, phase)`` for every tp collective issued.

    ``phase`` is "fwd" or "bwd" for the autograd functions, "state" for ``gather_full``
    and "grad" for sums of grads after backward.
    """
    log: list[tuple[str, str]] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _record(op: str, phase: str) -> None:
    for log in _logs:
        log.append((op, phase))


def all_reduce(x: Tensor, group: Group, phase: str, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """All-reduce ``x`` in place (recorded as ``phase``); not differentiable, see the classes."""
    if tp_size(group) > 1:
        _record("all_reduce", phase)
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: Tensor, dim: int, group: Group, phase: str) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (recorded as ``phase``); not differentiable."""
    world = tp_size(group)
    if world == 1:
        return x
    _record("all_gather", phase)
    # the flat collective concatenates along dim 0, so move ``dim`` there and back
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((world * front.shape[0], *front.shape[1:]))
    ALL_GATHER(out, front, group=group)
    # contiguous: callers view() the result; a copy only when dim is not 0 ((B, T, D)
    # activations pay a transpose each way, a sequence-first layout would not)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, dim: int, group: Group, phase: str) -> Tensor:
    world = tp_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(
            f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over tp={world}; "
            f"make the sequence length a multiple of {world}"
        )
    _record("reduce_scatter", phase)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    REDUCE_SCATTER(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _chunk(x: Tensor, dim: int, group: Group) -> Tensor:
    world = tp_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} over tp={world}; "
            f"make it a multiple of {world}"
        )
    # contiguous: a view would keep the whole tensor alive and confuse later collectives
    return x.chunk(world, dim=dim)[tp_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # each rank's branch contributes part of the input's grad: sum them. A copy, as
        # all_reduce works in place and autograd may hand the same grad to another branch
        grad = grad.clone(memory_format=torch.contiguous_format)
        return all_reduce(grad, ctx.group, "bwd"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:  # type: ignore[override]
        # clone: all_reduce works in place and x may be saved for another backward
        return all_reduce(x.clone(), group, "fwd")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group, "fwd")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group, "bwd"), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group, "fwd")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return all_gather(grad, ctx.dim, ctx.group, "bwd"), None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _chunk(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return all_gather(grad, ctx.dim, ctx.group, "bwd"), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group, "fwd")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # every rank holds the same grad of the replicated output: keep this rank's part
        return _chunk(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x: Tensor, group: Group) -> Tensor:
    """Identity forward, all-reduce backward: x enters a tp region replicated."""
    return x if tp_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group: Group) -> Tensor:
    """All-reduce forward, identity backward: sum the ranks' partial outputs."""
    return x if tp_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_seq(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """All-gather along the sequence dim forward, reduce-scatter backward (SP -> tp region)."""
    return x if tp_size(group) == 1 else _GatherSeq.apply(x, dim, group)


def reduce_scatter_seq(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """Reduce-scatter along the sequence dim forward, all-gather backward (tp region -> SP)."""
    return x if tp_size(group) == 1 else _ReduceScatterSeq.apply(x, dim, group)


def split_seq(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """Keep this rank's sequence chunk forward, all-gather backward (replicated -> SP)."""
    return x if tp_size(group) == 1 else _Split.apply(x, dim, group)


def split_last(x: Tensor, group: Group) -> Tensor:
    """Keep this rank's chunk of the last dim forward, all-gather backward."""
    return x if tp_size(group) == 1 else _Split.apply(x, x.ndim - 1, group)


def gather_last(x: Tensor, group: Group) -> Tensor:
    """All-gather along the last dim forward, keep this rank's chunk backward."""
    return x if tp_size(group) == 1 else _Gather.apply(x, x.ndim - 1, group)
