"""What a model family is: its flat block list, its boundary signature and its costs.

A family is composition. Its module (``models/families/<name>.py``) says which block
stands at each index of the flat list, which named tensors cross a cut after a given
block, and what its head's objective sums (the head's ``loss``: one summed term per
target tensor, see ``models.objective``). The runtime reads nothing else about it: no
block and no runtime code branches on a family's name.

Blocks talk in one of two ways. A *tensor* block (the decoder's) maps one tensor to
one tensor: token ids to ``hidden``, ``hidden`` to ``hidden``, ``hidden`` to logits; a
stage boundary then carries ``hidden`` alone. A *named* block (``named_io = True``)
maps a dict of named tensors to the next dict, so a boundary can carry several
(``hidden``, ``encoder_out``, masks). Every block has a ``role``: ``embedding`` (first),
``layer`` or ``head`` (last, with the objective).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conveyor.config import ModelConfig
from conveyor.models.attention import MaskedAttention
from conveyor.models.boundary import Signature

__all__ = ["Family", "Shapes", "estimate_costs"]

Shapes = Mapping[str, tuple[int, ...]]
"""Shapes of one microbatch's input tensors by name (a decoder's one tensor is ``tokens``)."""


@dataclass(frozen=True)
class Family:
    """A model family: the block at each index, what crosses each cut, and per-block costs."""

    name: str
    block: Callable[[ModelConfig, int], nn.Module]
    """The (uninitialised) block at an index of the flat list."""
    signature: Callable[..., Signature]
    """``(cfg, shapes, after_block, *, tp, sequence_parallel)`` -> the cut's tensors."""
    param_counts: Callable[[ModelConfig], list[int]]
    """Parameters of each block (a tied weight counted on both sides)."""
    forward_flops: Callable[[ModelConfig, int], list[float]]
    """Forward FLOPs of each block for one sequence of a given length."""
    activation_bytes: Callable[[ModelConfig, int, int], list[int]]
    """Bytes each block stashes for backward, per (batch, seq) microbatch, in fp32."""
    example: Callable[[ModelConfig, int, int, torch.Generator], tuple[Any, Any]]
    """Random (inputs, targets) of a (batch, seq) microbatch, every target counted (profiling)."""
    sequence_parallel: bool = False
    """Whether its boundaries can be split along the sequence under tensor parallelism."""
    generates: bool = False
    """Whether ``conveyor generate`` can continue text with it (a decoder with KV caches)."""
    seq2seq: bool = False
    """Whether ``conveyor generate`` maps sources to outputs with it (an encoder-decoder:
    ``runtime.seq2seq.Seq2SeqGenerator``)."""


def _meta_blocks(cfg: ModelConfig, block: Callable[[ModelConfig, int], nn.Module]) -> list[nn.Module]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return [block(cfg, i) for i in range(cfg.num_blocks)]


def estimate_costs(
    block: Callable[[ModelConfig, int], nn.Module],
) -> tuple[Callable[[ModelConfig], list[int]], Callable[[ModelConfig, int], list[float]],
           Callable[[ModelConfig, int, int], list[int]]]:
    """Generic per-block estimates read off the blocks' shapes: params, FLOPs, activations.

    Params are exact. FLOPs: 2 per weight per token for every parameter outside an
    embedding table, plus 4*T*T*D per attention (scores and weighted sum, no causal
    saving). Activations: per token 4 bytes x (10*D + 2*d_ff) per layer, 4 x (2*D + V)
    for the head, the ids' 8 bytes for the embedding.
    """

    def counts(cfg: ModelConfig) -> list[int]:
        return [sum(p.numel() for p in b.parameters()) for b in _meta_blocks(cfg, block)]

    def flops(cfg: ModelConfig, seq_len: int) -> list[float]:
        out = []
        for b in _meta_blocks(cfg, block):
            tables = {id(p) for m in b.modules() if isinstance(m, nn.Embedding)
                      for p in m.parameters()}
            weights = sum(p.numel() for p in b.parameters() if id(p) not in tables)
            attentions = sum(1 for m in b.modules() if isinstance(m, MaskedAttention))
            out.append(2.0 * seq_len * weights + 4.0 * seq_len * seq_len * cfg.d_model * attentions)
        return out

    def activations(cfg: ModelConfig, batch: int, seq_len: int) -> list[int]:
        tokens = batch * seq_len
        out = []
        for b in _meta_blocks(cfg, block):
            role = getattr(b, "role", "layer")
            if role == "embedding":
                out.append(8 * tokens)
            elif role == "head":
                out.append(4 * tokens * (2 * cfg.d_model + cfg.vocab_size))
            else:
                out.append(4 * tokens * (10 * cfg.d_model + 2 * cfg.ffn_dim))
        return out

    return counts, flops, activations
