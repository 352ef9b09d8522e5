"""Decoder-only transformers as a flat list of blocks (embedding, layers, head)."""

from conveyor.models.blocks import (
    EmbeddingBlock,
    HeadBlock,
    TransformerBlock,
    block_activation_bytes,
    block_forward_flops,
    block_param_counts,
    build_block,
    build_blocks,
    lm_loss,
    tie_weights,
)
from conveyor.models.layers import KVCache
from conveyor.models.transformer import Transformer

__all__ = [
    "EmbeddingBlock",
    "TransformerBlock",
    "HeadBlock",
    "KVCache",
    "Transformer",
    "build_block",
    "build_blocks",
    "tie_weights",
    "lm_loss",
    "block_param_counts",
    "block_forward_flops",
    "block_activation_bytes",
]
