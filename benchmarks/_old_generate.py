"""The pipelined generation that the executor-based one replaced, kept to measure against.

One sequence at a time; each step sends the newest positions' hidden states to the
next rank by hand and broadcasts the sampled token from the last rank to all, so
only one stage computes at any time. Not part of the library: the benchmark
``generate_throughput.py`` runs it as the baseline issue 16 asked to beat.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.generation import (
    CachedBlocks,
    check_prompt,
    context_budget,
    decode_loop,
    sample_next,
)
from conveyor.generation.batch import Sampling
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.comm import wait_work

__all__ = ["generate_one_at_a_time"]

_TAG = 7  # hidden states between neighbouring stages; each pair talks in order


@torch.no_grad()
def generate_one_at_a_time(
    blocks: Mapping[int, nn.Module],
    cfg: ModelConfig,
    mesh: Mesh,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    on_token: Callable[[int], None] | None = None,
    timeout_s: float = 300.0,
) -> list[int]:
    """The replaced pipelined generation: one sequence, hand-written send/recv/broadcast.

    Every pipeline rank calls this with the same prompt and settings; each returns
    the new token ids and calls ``on_token`` on its own rank.
    """
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    ids = check_prompt(prompt_ids, cfg)
    budget = context_budget(len(ids), max_new_tokens, cfg.max_seq_len)
    if budget == 0:
        return []
    stage, pp = mesh.pp_rank, mesh.pp
    first, last = stage == 0, stage == pp - 1
    holds_embedding, holds_head = 0 in blocks, cfg.num_blocks - 1 in blocks
    if (holds_embedding, holds_head) != (first, last):
        raise ValueError(
            f"pipeline rank {stage} of {pp} holds blocks {sorted(blocks)}; the first rank "
            "must hold the embedding (block 0) and the last the head, e.g. from build_stage"
        )
    device = next(next(iter(blocks.values())).parameters()).device
    dtype = next(next(iter(blocks.values())).parameters()).dtype
    stack = CachedBlocks(blocks, cfg, 1, len(ids) + budget - 1, device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if last else None
    timeout = datetime.timedelta(seconds=timeout_s)
    prev_rank = mesh.pp_ranks[stage - 1] if not first else None
    next_rank = mesh.pp_ranks[stage + 1] if not last else None
    last_rank = mesh.pp_ranks[-1]
    where = f"pipeline rank {stage} (global rank {mesh.rank})"

    def step(chunk: list[int], start_pos: int) -> int:
        span = f"positions {start_pos}..{start_pos + len(chunk) - 1}"
        if first:
            x = torch.tensor([chunk], dtype=torch.long, device=device)  # (1, T)
        else:
            x = torch.empty(1, len(chunk), cfg.d_model, dtype=dtype, device=device)  # (1, T, D)
            work = dist.irecv(x, src=prev_rank, group=mesh.pp_group, tag=_TAG)
            wait_work(work, timeout, f"{where} waiting for hidden states of {span} "
                                 f"from global rank {prev_rank}")
        y = stack(x, start_pos)
        token = torch.empty(1, dtype=torch.long, device=device)
        if last:
            token = sample_next(
                y, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
        else:
            work = dist.isend(y.contiguous(), dst=next_rank, group=mesh.pp_group, tag=_TAG)
            wait_work(work, timeout, f"{where} sending hidden states of {span} "
                                 f"to global rank {next_rank}")
        work = dist.broadcast(token, src=last_rank, group=mesh.pp_group, async_op=True)
        wait_work(work, timeout, f"{where} waiting for the token after {span} "
                             f"from global rank {last_rank}")
        return int(token[0])

    return decode_loop(ids, budget, step, stop_at_eot=sampling.stop_at_eot,
                       eot_id=sampling.eot_id, on_token=on_token)
