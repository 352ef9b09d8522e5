"""Decoder-only LM (GPT-2 / Llama flavours): embedding, n_layers causal blocks, LM head.

Blocks are tensor blocks: token ids (B, T) -> hidden (B, T, D) -> logits (B, T, V); every
cut carries ``hidden``. Objective: next-token cross-entropy summed over the targets
(the batch's single target tensor), see ``HeadBlock.loss``. With ``num_labels > 0`` the
head is ``models.classify.TokenClassifier``: class logits at every position, the targets
labelling each row's last real token only (-100 elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
from conveyor.models.classify import TokenClassifier
from conveyor.models.family import Family, Shapes

__all__ = ["GPT"]


def _block(cfg: ModelConfig, index: int) -> nn.Module:
    if index == 0:
        return EmbeddingBlock(cfg)
    if index == cfg.num_blocks - 1:
        return TokenClassifier(cfg) if cfg.num_labels else HeadBlock(cfg)
    return TransformerBlock(cfg)


def _param_counts(cfg: ModelConfig) -> list[int]:
    counts = block_param_counts(cfg)
    if cfg.num_labels:  # the closed forms count an LM head; a classifier's is its norm + D x L
        counts[-1] = sum(p.numel() for p in _meta_head(cfg).parameters())
    return counts


def _forward_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
    flops = block_forward_flops(cfg, seq_len)
    if cfg.num_labels:
        flops[-1] = 2.0 * seq_len * cfg.d_model * cfg.num_labels
    return flops


def _meta_head(cfg: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return TokenClassifier(cfg)


def _signature(cfg: ModelConfig, shapes: Shapes, after_block: int, *, tp: int = 1,
               sequence_parallel: bool = False) -> Signature:
    batch, seq = shapes["tokens"]
    return boundary_signature(cfg, batch, seq, after_block, tp=tp,
                              sequence_parallel=sequence_parallel)


def _example(cfg: ModelConfig, batch: int, seq: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(cfg.vocab_size, (batch, seq), generator=gen)
    return tokens, torch.randint(cfg.vocab_size, (batch, seq), generator=gen)


GPT = Family("gpt", _block, _signature, _param_counts, _forward_flops,
             block_activation_bytes, _example, sequence_parallel=True, generates=True)
