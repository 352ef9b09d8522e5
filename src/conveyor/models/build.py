"""Building any family's blocks, each initialised on its own; per-block costs by family.

Block ``i`` draws its weights from a generator seeded by ``(seed, i)`` alone, so any
subset of blocks built on any process equals the same slice of the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from conveyor.config import ModelConfig
from conveyor.models.blocks import initialise, tie_weights
from conveyor.models.families import family_of

__all__ = ["build_block", "build_blocks", "block_param_counts", "block_forward_flops",
           "block_activation_bytes"]


def build_block(cfg: ModelConfig, index: int, seed: int) -> nn.Module:
    """Build block ``index`` of the flat list, initialised from ``(seed, index)`` only."""
    if not 0 <= index < cfg.num_blocks:
        raise ValueError(
            f"block index {index} is out of range; this {cfg.family} model has blocks "
            f"0..{cfg.num_blocks - 1} (embedding, layers, head)"
        )
    block = family_of(cfg).block(cfg, index)
    initialise(block, cfg, index, seed)
    return block


def build_blocks(
    cfg: ModelConfig,
    seed: int,
    indices: Iterable[int] | None = None,
    transform: Callable[[nn.Module], nn.Module] | None = None,
) -> list[nn.Module]:
    """Build the given blocks (all by default), tying embedding and head when both are here.

    ``transform`` rebuilds each block right after its full-size initialisation (e.g.
    into its tensor-parallel shard), before the tie.
    """
    order = list(range(cfg.num_blocks)) if indices is None else list(indices)
    blocks = [build_block(cfg, i, seed) for i in order]
    if transform is not None:
        blocks = [transform(b) for b in blocks]
    head = cfg.num_blocks - 1
    if cfg.tie_embeddings and 0 in order and head in order:
        tie_weights(blocks[order.index(0)], blocks[order.index(head)])
    return blocks


def block_param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters of each block in order; a tied weight counts on both embedding and head."""
    return family_of(cfg).param_counts(cfg)


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs of each block for one sequence of ``seq_len`` tokens (2 per multiply-add)."""
    return family_of(cfg).forward_flops(cfg, seq_len)


def block_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> list[int]:
    """Estimated bytes each block stashes for backward, per microbatch, in fp32."""
    return family_of(cfg).activation_bytes(cfg, batch, seq_len)
