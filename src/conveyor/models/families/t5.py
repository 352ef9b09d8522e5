"""Encoder-decoder (T5-style), pipelined as ONE chain: encoder layers, a bridge, decoder layers.

Flat list (n = n_layers)::

    0             T5Embedding   tokens, decoder_tokens -> hidden, decoder_hidden (one shared table)
    1 .. n        EncoderLayer  bidirectional over hidden, padding-masked
    n + 1         T5Bridge      encoder_out = norm(hidden); hidden = decoder_hidden
    n + 2 .. 2n+1 DecoderLayer  causal self-attention, cross-attention to encoder_out
    2n + 2        T5Head        final norm, projection (tied to the table when tie_embeddings)

Both token streams are embedded by the first block, so the shared table lives in one
place; the decoder's embeddings ride along the encoder's cuts (``decoder_hidden``). A
cut up to the bridge carries ``hidden`` (B, S, D), ``decoder_hidden`` (B, T, D) and both
masks; a cut after it carries ``hidden`` (B, T, D), ``encoder_out`` (B, S, D) and both
masks. ``encoder_out`` passes through every decoder stage: each stage's cross-attentions
add their grads to the one it received and send the sum back, so the bridge hands the
encoder the sum over every decoder layer. Any split works, including a stage holding
the last encoder layer, the bridge and the first decoder layer.

Inputs: ``tokens``, ``attention_mask`` (B, S) and ``decoder_tokens``, ``decoder_mask``
(B, T) int64 (teacher forcing: the decoder reads the target shifted right). Target:
``lm`` (B, T), -100 at padding. Positions: a learned relative position bias in every
self-attention (T5 shares one table per stack across its layers; one per layer keeps
each block self-contained, so no parameter is shared across stages). Norms and MLP
follow the flavour (llama: RMSNorm and a gated MLP, as in T5 v1.1, without biases).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.boundary import Signature, TensorSpec
from conveyor.models.family import Family, Shapes, estimate_costs
from conveyor.models.layers import make_final_norm, make_norm
from conveyor.models.linear import Linear
from conveyor.models.objective import cross_entropy_sum
from conveyor.models.stack import (
    DecoderLayer,
    EncoderLayer,
    NamedBlock,
    NamedEmbedding,
    NamedHead,
    State,
)

__all__ = ["T5", "T5Bridge", "T5Embedding", "T5Head"]


class T5Embedding(NamedEmbedding):
    """One token table for the encoder's and the decoder's ids."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, batch: State) -> State:
        """tokens (B, S), decoder_tokens (B, T) and masks -> hidden, decoder_hidden and masks."""
        return {"hidden": self.tok(batch["tokens"]), "attention_mask": batch["attention_mask"],
                "decoder_hidden": self.tok(batch["decoder_tokens"]),
                "decoder_mask": batch["decoder_mask"]}

    def embed(self, ids: Tensor) -> Tensor:
        """One stream's token ids (B, T) -> embeddings (B, T, D) (generation embeds them apart)."""
        return self.tok(ids)


class T5Bridge(NamedBlock):
    """The encoder's final norm: its output becomes encoder_out, the decoder stream hidden."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_norm(cfg)  # kept under post-norm too: a stage may hold the bridge alone

    def forward(self, state: State) -> State:
        """hidden (B, S, D), decoder_hidden (B, T, D) -> hidden (B, T, D), encoder_out (B, S, D)."""
        return {"hidden": state["decoder_hidden"], "encoder_out": self.norm(state["hidden"]),
                "attention_mask": state["attention_mask"], "decoder_mask": state["decoder_mask"]}

    def encoder_out(self, hidden: Tensor) -> Tensor:
        """The encoder stream (B, S, D) -> encoder_out (generation runs the streams apart)."""
        return self.norm(hidden)


class T5Head(NamedHead):
    """Final decoder norm and the vocabulary projection; summed cross-entropy of ``lm``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_final_norm(cfg)
        self.proj = Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        # replaced by vocabulary-parallel cross-entropy when tp splits the logits
        self.criterion: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum

    def forward(self, state: State) -> Tensor:
        """hidden (B, T, D) -> logits (B, T, V)."""
        return self.proj(self.norm(state["hidden"]))

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """The one term ``lm``: cross-entropy summed over the decoder's counted targets."""
        return {"lm": self.criterion(logits, targets["lm"])}


def _block(cfg: ModelConfig, index: int) -> nn.Module:
    n = cfg.n_layers
    if index == 0:
        return T5Embedding(cfg)
    if index <= n:
        return EncoderLayer(cfg, relative_bias=True)
    if index == n + 1:
        return T5Bridge(cfg)
    if index < cfg.num_blocks - 1:
        return DecoderLayer(cfg, relative_bias=True)
    return T5Head(cfg)


def _signature(cfg: ModelConfig, shapes: Shapes, after_block: int, *, tp: int = 1,
               sequence_parallel: bool = False) -> Signature:
    del tp, sequence_parallel  # tp is refused for this family before a pipeline is built
    (batch, src), (_, tgt) = shapes["tokens"], shapes["decoder_tokens"]
    D = cfg.d_model
    masks = {"attention_mask": TensorSpec((batch, src), torch.int64, grad=False),
             "decoder_mask": TensorSpec((batch, tgt), torch.int64, grad=False)}
    if after_block <= cfg.n_layers:  # still in the encoder: the decoder's embeddings ride along
        return {"hidden": TensorSpec((batch, src, D), torch.float32),
                "decoder_hidden": TensorSpec((batch, tgt, D), torch.float32), **masks}
    return {"hidden": TensorSpec((batch, tgt, D), torch.float32),
            "encoder_out": TensorSpec((batch, src, D), torch.float32), **masks}


def _example(cfg: ModelConfig, batch: int, seq: int, gen: torch.Generator) -> tuple[State, State]:
    # the decoder reads about what span corruption gives it: 15% noise, sentinels, eos
    tgt = max(1, (3 * seq) // 10)
    tokens = torch.randint(cfg.vocab_size, (batch, seq), generator=gen)
    decoder = torch.randint(cfg.vocab_size, (batch, tgt), generator=gen)
    inputs = {"tokens": tokens, "attention_mask": torch.ones_like(tokens),
              "decoder_tokens": decoder, "decoder_mask": torch.ones_like(decoder)}
    return inputs, {"lm": torch.randint(cfg.vocab_size, (batch, tgt), generator=gen)}


T5 = Family("t5", _block, _signature, *estimate_costs(_block), _example, seq2seq=True)
