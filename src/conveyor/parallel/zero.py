"""ZeRO-1: each data-parallel rank keeps optimizer state for 1/dp of every parameter.

Every parameter's flattened elements are cut into dp equal chunks (the last padded);
dp rank ``r`` owns chunk ``r`` of each, as a 1-D leaf the optimizer steps. After the
step the chunks are all-gathered (one collective for all of this rank's parameters)
and written back, so every replica again holds the whole, identical parameters.

Grads are reduce-scattered, not all-reduced: a group of parameters' local grads is
laid out rank by rank (``scatter_input``: row ``r`` holds chunk ``r`` of each, padded),
so one reduce-scatter hands each rank the dp-sum of exactly the chunks it owns, half
the traffic of an all-reduce and no whole averaged grad anywhere. The pipeline's
buckets issue these during backward (``parallel.data``); ``add_scattered`` accumulates
the averaged chunks into the leaves' ``.grad`` and drops the whole local grads. Any
elementwise optimizer (AdamW, SGD) then updates exactly as the unsharded one would.
Checkpoints see the logical state: ``full_state`` gathers each parameter's moments
over dp, ``load_state`` slices them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ZeroShards", "chunk_size", "reduce_scatter"]


def reduce_scatter(output: Tensor, input: Tensor, group: dist.ProcessGroup | None,
                   async_op: bool = False) -> dist.Work | None:
    """Sum ``input`` (dp equal parts) over ``group``; this rank's part lands in ``output``.

    ``dist.reduce_scatter_single`` from torch 2.13 on, ``reduce_scatter_tensor`` (the same
    call, now deprecated) before; looked up at call time, so tests can count it.
    """
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def chunk_size(numel: int, dp: int) -> int:
    """Elements of a ``numel``-element parameter per dp rank (the last chunk padded)."""
    return -(-numel // dp)


@dataclass
class _Shard:
    name: str
    param: nn.Parameter  # the whole (tp-local) parameter every replica holds
    shard: nn.Parameter  # this dp rank's chunk, flat, what the optimizer steps
    chunk: int  # elements per dp rank (the last rank's chunk may be padding in part)
    lo: int
    hi: int


class ZeroShards:
    """This dp rank's chunks of its parameters: the optimizer's leaves under ZeRO-1."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        group: dist.ProcessGroup | None,
        dp: int,
        dp_rank: int,
    ) -> None:
        self.group = group
        self.dp = dp
        self.dp_rank = dp_rank
        self.shards: list[_Shard] = []
        for name, p in named_params:
            n = p.numel()
            chunk = chunk_size(n, dp)
            lo, hi = min(n, dp_rank * chunk), min(n, (dp_rank + 1) * chunk)
            leaf = nn.Parameter(p.detach().reshape(-1)[lo:hi].clone())
            if hasattr(p, "tp_shard_dim"):  # clipping counts tp replicas once by it
                leaf.tp_shard_dim = p.tp_shard_dim  # type: ignore[attr-defined]
            self.shards.append(_Shard(name, p, leaf, chunk, lo, hi))
        self._of = {id(s.param): s for s in self.shards}
        dtypes = {s.param.dtype for s in self.shards}
        if len(dtypes) > 1:  # one packed buffer per gather
            raise ValueError(f"ZeRO-1 needs parameters of one dtype, got {sorted(map(str, dtypes))}")

    def named_shards(self) -> list[tuple[str, nn.Parameter]]:
        """(parameter name, this rank's chunk of it) for every parameter, in order."""
        return [(s.name, s.shard) for s in self.shards]

    def leaves(self) -> list[nn.Parameter]:
        """This rank's chunks, the optimizer's leaves; their ``.grad`` is the averaged chunk."""
        return [s.shard for s in self.shards]

    def leaf_of(self, param: nn.Parameter) -> nn.Parameter:
        """This rank's chunk of whole parameter ``param``."""
        return self._of[id(param)].shard

    def ndims(self) -> dict[str, int]:
        """Each parameter's own ndim (its chunk is flat), e.g. to choose weight decay."""
        return {s.name: s.param.ndim for s in self.shards}

    # -- grads: reduce-scatter -----------------------------------------------------------

    @torch.no_grad()
    def scatter_input(self, params: list[nn.Parameter]) -> tuple[Tensor, Tensor]:
        """The local grads of ``params`` flat, rank by rank, and the buffer for this rank's part.

        Row ``r`` of the input holds chunk ``r`` of every parameter in order, each padded
        to its chunk size (a missing grad counts as zeros), so ``reduce_scatter``
        of the two leaves row ``dp_rank``, summed over dp, in the output.
        """
        shards = [self._of[id(p)] for p in params]
        ref = shards[0].param
        width = sum(s.chunk for s in shards)
        rows = torch.zeros(self.dp, width, dtype=ref.dtype, device=ref.device)
        off = 0
        for s in shards:
            if s.param.grad is not None:
                flat = s.param.grad.reshape(-1)
                whole = flat.numel() // s.chunk  # rows this parameter fills; then a partial one
                rows[:whole, off:off + s.chunk].copy_(flat[:whole * s.chunk].view(whole, s.chunk))
                rest = flat.numel() - whole * s.chunk
                if rest:
                    rows[whole, off:off + rest].copy_(flat[whole * s.chunk:])
            off += s.chunk
        return rows.view(-1), torch.empty(width, dtype=ref.dtype, device=ref.device)

    @torch.no_grad()
    def add_scattered(self, params: list[nn.Parameter], mine: Tensor) -> None:
        """Add this rank's reduced chunks (``mine``, laid out as ``scatter_input``'s output,
        already averaged) to the leaves' grads; drop the whole local grads they came from."""
        off = 0
        for p in params:
            s = self._of[id(p)]
            part = mine[off:off + s.hi - s.lo]
            s.shard.grad = part.clone() if s.shard.grad is None else s.shard.grad.add_(part)
            s.param.grad = None
            off += s.chunk

    def reduce_scatter_grads(self, params: list[nn.Parameter]) -> None:
        """Average ``params``' grads over dp into the leaves, one blocking reduce-scatter each."""
        for p in params:
            flat, mine = self.scatter_input([p])
            reduce_scatter(mine, flat, self.group)
            self.add_scattered([p], mine.div_(self.dp))

    def zero_grad(self) -> None:
        """Drop the leaves' grads."""
        for s in self.shards:
            s.shard.grad = None

    # -- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` on this rank's chunks (grads reduce-scattered), then all-gather."""
        optimizer.step()
        self._gather_params()

    def _gather_params(self) -> None:
        """Every replica's chunks, all-gathered at once, written into the whole parameters."""
        mine = self._pack([s.shard.detach() for s in self.shards])
        for s, full in zip(self.shards, self._all_gather(mine), strict=True):
            s.param.detach().reshape(-1).copy_(full)

    def _pack(self, chunks: list[Tensor]) -> Tensor:
        """This rank's chunks in one buffer, each padded to its parameter's chunk size."""
        if not self.shards:
            return torch.zeros(0)
        ref = self.shards[0].param
        buf = torch.zeros(sum(s.chunk for s in self.shards), dtype=ref.dtype, device=ref.device)
        off = 0
        for s, c in zip(self.shards, chunks, strict=True):
            buf[off:off + c.numel()].copy_(c.reshape(-1))
            off += s.chunk
        return buf

    def _all_gather(self, mine: Tensor) -> list[Tensor]:
        """Each parameter's whole flat tensor, assembled from every rank's packed chunks."""
        bufs = [torch.empty_like(mine) for _ in range(self.dp)]
        dist.all_gather(bufs, mine, group=self.group)
        out, off = [], 0
        for s in self.shards:
            parts = [b[off:off + s.chunk] for b in bufs]
            out.append(torch.cat(parts)[: s.param.numel()])
            off += s.chunk
        return out

    def full_state(self, optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
        """Per parameter name, its optimizer state gathered over dp and shaped like it.

        Collective over the dp group; scalar entries (AdamW's ``step``) are equal on every
        rank and taken as they are. Empty before the first step.
        """
        states = [optimizer.state.get(s.shard, {}) for s in self.shards]
        if not any(states):
            return {}
        out: dict[str, dict[str, Tensor]] = {s.name: {} for s in self.shards}
        for key in keys:
            vals = [st[key] for st in states]
            if vals[0].dim() == 0:
                for s, v in zip(self.shards, vals, strict=True):
                    out[s.name][key] = v.clone()
                continue
            for s, full in zip(self.shards, self._all_gather(self._pack(vals)), strict=True):
                out[s.name][key] = full.view_as(s.param).clone()
        return out

    def load_state(self, optimizer: torch.optim.Optimizer, full: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Give the optimizer this rank's chunks of logical per-parameter state (by name)."""
        for s in self.shards:
            state = full[s.name]
            optimizer.state[s.shard] = {
                # a scalar is AdamW's step: a CPU float32, as it keeps it when not fused
                k: (v.detach().to(s.shard.device, s.shard.dtype).reshape(-1)[s.lo:s.hi].clone()
                    if v.dim() else v.detach().to("cpu", torch.float32).clone())
                for k, v in state.items()
            }

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Reload the chunks from the whole parameters (after they were loaded or changed)."""
        for s in self.shards:
            s.shard.copy_(s.param.detach().reshape(-1)[s.lo:s.hi])
