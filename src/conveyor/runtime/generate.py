"""Pipelined text generation: one stage of the model per pipeline rank.

Each rank holds only its stage's blocks and their KV caches. One step, for the
newest positions (the whole prompt first, then one token at a time)::

    rank 0            rank 1                 rank pp-1
    embed + blocks ─► blocks ─► ... ─► blocks + head -> logits -> sample
         ▲                                                          │
         └──────────── broadcast the token to every rank ◄──────────┘

The last rank samples with the same seeded generator as single-process
:func:`conveyor.generation.generate` and runs the same blocks the same way
(:class:`~conveyor.generation.CachedBlocks`), so both give the same tokens. Every
rank learns each token, so all stop at the same step. One sequence leaves all
but one stage idle at any time; generation here is about fitting a model that is
split for training, not about speed.

Weights arrive through a loader, ``names -> tensors`` by global name
(``blocks.3.mlp.up.weight``), so this module needs no checkpoint format.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig
from ..generation import (
    CachedBlocks,
    GenerationError,
    check_prompt,
    check_sampling,
    context_budget,
    decode_loop,
    sample_next,
)
from ..models import EmbeddingBlock, HeadBlock, build_blocks
from ..parallel.mesh import Mesh
from ..parallel.partition import Partition
from .comm import wait_work

__all__ = ["WeightLoader", "weight_sources", "load_block_weights", "build_stage",
           "generate_pipelined"]

WeightLoader = Callable[[Sequence[str]], Mapping[str, Tensor]]
"""Given global tensor names, return those tensors (e.g. a checkpoint reader)."""

_TAG = 7  # hidden states between neighbouring stages; each pair talks in order


def weight_sources(cfg: ModelConfig, blocks: Mapping[int, nn.Module]) -> dict[str, str]:
    """Global name of each tensor of ``blocks`` -> the stored name to load it from.

    A tied head loads the embedding's token table: a checkpoint need store it once.
    """
    head = cfg.num_blocks - 1
    sources = {}
    for i, block in blocks.items():
        for name in block.state_dict():
            src = f"blocks.{i}.{name}"
            if cfg.tie_embeddings and i == head and name == HeadBlock.tied_param_name:
                src = f"blocks.0.{EmbeddingBlock.tied_param_name}"
            sources[f"blocks.{i}.{name}"] = src
    return sources


def load_block_weights(
    cfg: ModelConfig, blocks: Mapping[int, nn.Module], load: WeightLoader
) -> None:
    """Copy the stored weights into ``blocks`` (block index -> module), by global name."""
    sources = weight_sources(cfg, blocks)
    tensors = load(sorted(set(sources.values())))
    missing = sorted({s for s in sources.values() if s not in tensors})
    if missing:
        raise GenerationError(
            f"{len(missing)} weights are missing from the checkpoint, e.g. {missing[0]}; "
            "pass a checkpoint written for this model config"
        )
    for i, block in blocks.items():
        prefix = f"blocks.{i}."
        state = {
            name[len(prefix):]: tensors[src]
            for name, src in sources.items()
            if name.startswith(prefix)
        }
        try:
            block.load_state_dict(state, strict=True)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise GenerationError(
                f"checkpoint weights do not fit block {i} of the model config ({detail}); "
                "pass the config the checkpoint was trained with"
            ) from None


def build_stage(
    cfg: ModelConfig,
    partition: Partition,
    stage: int,
    *,
    load: WeightLoader | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[int, nn.Module]:
    """The blocks of ``stage`` (index -> module), loaded by name, else seed-initialised."""
    indices = list(partition.blocks_of(stage))
    blocks = dict(zip(indices, build_blocks(cfg, seed, indices), strict=True))
    if load is not None:
        load_block_weights(cfg, blocks, load)
    for block in blocks.values():
        block.to(device or torch.device("cpu")).eval()
    return blocks


@torch.no_grad()
def generate_pipelined(
    blocks: Mapping[int, nn.Module],
    cfg: ModelConfig,
    mesh: Mesh,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_at_eot: bool = True,
    eot_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    timeout_s: float = 300.0,
) -> list[int]:
    """Generate with this rank's ``blocks`` as pipeline stage ``mesh.pp_rank`` (collective).

    Every pipeline rank calls this with the same prompt and settings; each returns
    the new token ids and calls ``on_token`` on its own rank. Same stopping rules
    and errors as :func:`conveyor.generation.generate`. A wait longer than
    ``timeout_s`` raises CommTimeout naming the rank, the step and the peer.
    """
    check_sampling(temperature, top_k, top_p)
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
    generator = torch.Generator(device=device).manual_seed(seed) if last else None
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

    return decode_loop(ids, budget, step, stop_at_eot=stop_at_eot, eot_id=eot_id,
                       on_token=on_token)
