"""Gradient clipping by the global norm over every pipeline stage.

Each rank holds only its stages' gradients, so the norm is assembled from local
sums of squares, all-reduced over the pipeline group. Two kinds of copies must
not count twice: the head's duplicate of a tied embedding (its grad equals the
embedding's after the pipeline sums them) and data-parallel replicas (their grads
are already averaged, so each replica's pipeline alone holds the whole norm). Under
ZeRO-1 each dp rank holds its own chunk of every averaged grad instead, and the
squares are summed over ``dp_group`` too.
Under tensor parallelism a sharded parameter (``tp_shard_dim`` set) holds part of
a logical tensor, so its squares are summed over the tp group; a replicated one
(norms, row biases: equal on every tp rank) is counted on tp rank 0 only.
The clip coefficient is torch.nn.utils.clip_grad_norm_'s, so a pipeline run clips
exactly as the single-process model would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["clip_global_grad_norm"]


def clip_global_grad_norm(
    params: Iterable[nn.Parameter],
    max_norm: float,
    *,
    group: dist.ProcessGroup | None = None,
    tp_group: dist.ProcessGroup | None = None,
    duplicates: Iterable[nn.Parameter] = (),
    dp_group: dist.ProcessGroup | None = None,
) -> float:
    """Scale grads so their global L2 norm is at most ``max_norm``; return the norm before.

    ``group`` is the pipeline group to sum over (None: this process holds every stage),
    ``tp_group`` the tensor-parallel group (None: no tp), ``dp_group`` the data-parallel
    group when ``params`` are ZeRO-1 chunks (None: replicas hold whole grads).
    ``duplicates`` are scaled like the rest but left out of the norm. ``max_norm <= 0``
    only measures.
    """
    params = [p for p in params if p.grad is not None]
    skip = {id(p) for p in duplicates}
    tp = tp_group is not None and dist.get_world_size(tp_group) > 1
    # replicated params are the same on every tp rank: one rank counts them
    count_replicated = not tp or dist.get_rank(tp_group) == 0
    device = params[0].grad.device if params else torch.device("cpu")
    counted = [
        p.grad for p in params
        if id(p) not in skip
        and (count_replicated or getattr(p, "tp_shard_dim", None) is not None)
    ]
    # one fused kernel per device and dtype instead of one norm per parameter (a GPT-2
    # has ~150 parameters: per-parameter norms cost more than torch's whole clip)
    norms = [n.to(device) for n in torch._foreach_norm(counted)] if counted else []
    total_sq = (torch.stack(norms).double().square().sum() if norms
                else torch.zeros((), dtype=torch.float64, device=device))
    if tp:  # first over tp: every rank of a tp group then holds the same partial sum
        dist.all_reduce(total_sq, group=tp_group)
    for g in (group, dp_group):
        if g is not None and dist.get_world_size(g) > 1:
            dist.all_reduce(total_sq, group=g)
    total: Tensor = total_sq.sqrt().float()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)
