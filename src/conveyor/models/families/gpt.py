"""Decoder-only LM (GPT-2 / Llama flavours): embedding, n_layers causal blocks, LM head.

Blocks are tensor blocks: token ids (B, T) -> hidden (B, T, D) -> logits (B, T, V); every
cut carries ``hidden``. Objective: next-token cross-entropy summed over the targets
(the batch's single target tensor), see ``HeadBlock.loss``.
"""

from __future__ import annotations

from torch import nn

from conveyor.config import ModelConfig
from conveyor.models.blocks import (
    EmbeddingBlock,
    HeadBlock,
    TransformerBlock,
    block_activation_bytes,
    block_forward_flops,
    block_param_counts,
)
from conveyor.models.boundary import Signature, boundary_signature
from conveyor.models.family import Family, Shapes

__all__ = ["GPT"]


def _block(cfg: ModelConfig, index: int) -> nn.Module:
    if index == 0:
        return EmbeddingBlock(cfg)
    if index == cfg.num_blocks - 1:
        return HeadBlock(cfg)
    return TransformerBlock(cfg)


def _signature(cfg: ModelConfig, shapes: Shapes, after_block: int, *, tp: int = 1,
               sequence_parallel: bool = False) -> Signature:
    batch, seq = shapes["tokens"]
    return boundary_signature(cfg, batch, seq, after_block, tp=tp,
                              sequence_parallel=sequence_parallel)


GPT = Family("gpt", _block, _signature, block_param_counts, block_forward_flops,
             block_activation_bytes, tensor_parallel=True)
