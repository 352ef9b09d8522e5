"""ZeRO-1: each data-parallel rank keeps optimizer state for 1/dp of every parameter.

Every parameter's flattened elements are cut into dp equal chunks (the last padded);
dp rank ``r`` owns chunk ``r`` of each, as a 1-D leaf the optimizer steps. After the
step the chunks are all-gathered (one collective for all of this rank's parameters)
and written back, so every replica again holds the whole, identical parameters.
Grads arrive already averaged over dp (the pipeline's bucketed all-reduce); each rank
reads its chunk of them. Any elementwise optimizer (AdamW, SGD) then updates exactly
as the unsharded one would. Checkpoints see the logical state: ``full_state`` gathers
each parameter's moments over dp, ``load_state`` slices them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ZeroShards"]


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
            chunk = -(-n // dp)
            lo, hi = min(n, dp_rank * chunk), min(n, (dp_rank + 1) * chunk)
            leaf = nn.Parameter(p.detach().reshape(-1)[lo:hi].clone())
            self.shards.append(_Shard(name, p, leaf, chunk, lo, hi))
        dtypes = {s.param.dtype for s in self.shards}
        if len(dtypes) > 1:  # one packed buffer per gather
            raise ValueError(f"ZeRO-1 needs parameters of one dtype, got {sorted(map(str, dtypes))}")

    def named_shards(self) -> list[tuple[str, nn.Parameter]]:
        """(parameter name, this rank's chunk of it) for every parameter, in order."""
        return [(s.name, s.shard) for s in self.shards]

    def ndims(self) -> dict[str, int]:
        """Each parameter's own ndim (its chunk is flat), e.g. to choose weight decay."""
        return {s.name: s.param.ndim for s in self.shards}

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` on this rank's chunks of the (averaged) grads, then all-gather."""
        for s in self.shards:
            g = s.param.grad
            s.shard.grad = None if g is None else g.reshape(-1)[s.lo:s.hi].clone()
        optimizer.step()
        for s in self.shards:
            s.shard.grad = None
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
