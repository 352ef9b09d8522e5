"""Transformer families as flat lists of blocks (embedding, layers, head).

``models.families`` lists each family (gpt, bert, t5); ``build_blocks`` builds any of
them; ``Transformer`` is the decoder's single-process model (with KV caches),
``SequentialModel`` any family's.
"""

from conveyor.models.blocks import (
    EmbeddingBlock,
    HeadBlock,
    TransformerBlock,
    lm_loss,
    tie_weights,
)
from conveyor.models.build import (
    block_activation_bytes,
    block_forward_flops,
    block_param_counts,
    build_block,
    build_blocks,
)
from conveyor.models.layers import KVCache
from conveyor.models.sequential import SequentialModel
from conveyor.models.transformer import Transformer

__all__ = [
    "EmbeddingBlock",
    "TransformerBlock",
    "HeadBlock",
    "KVCache",
    "SequentialModel",
    "Transformer",
    "build_block",
    "build_blocks",
    "tie_weights",
    "lm_loss",
    "block_param_counts",
    "block_forward_flops",
    "block_activation_bytes",
]
