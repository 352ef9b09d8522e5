"""Encoder (BERT-style): masked LM plus next-sentence prediction, bidirectional attention.

Flat list: ``BertEmbedding`` (token + learned position + segment, then a norm), n_layers
``EncoderLayer`` (bidirectional, padding-masked), ``BertHead`` (final norm; MLM
transform and vocabulary projection, tied to the token table when tie_embeddings; a
pooler and a two-way next-sentence classifier on the first token).

- inputs: ``tokens``, ``segments`` (0 for sentence A, 1 for B), ``attention_mask``
  (1 real, 0 padding), all (B, T) int64;
- every cut carries ``hidden`` (B, T, D) and ``attention_mask`` (B, T), the mask with
  no gradient;
- targets: ``mlm`` (B, T), the original token at masked positions and -100 elsewhere,
  and optionally ``nsp`` (B,), 0 when B follows A, 1 when B is random. Each is one loss
  term, normalised by its own count over the global batch.
- fine-tuning (``num_labels > 0``): the head is ``models.classify.PooledClassifier``
  (same ``norm`` and ``pooler``), target ``label`` (B,).

The norms, MLP and biases follow the flavour (gpt2: LayerNorm, GELU, biases). Layers
are pre-norm by default, with a final norm in the head; ``norm_position="post"`` with
``activation="gelu"`` and ``head_bias`` is the original BERT (Hugging Face's
``BertForMaskedLM``): the same stack as the decoder's, with the causal mask replaced by
the padding mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.boundary import Signature, TensorSpec
from conveyor.models.classify import PooledClassifier
from conveyor.models.family import Family, Shapes, estimate_costs
from conveyor.models.layers import ACTIVATION_FNS, make_final_norm, make_norm
from conveyor.models.linear import Linear
from conveyor.models.objective import cross_entropy_sum
from conveyor.models.stack import EncoderLayer, NamedEmbedding, NamedHead, State

__all__ = ["BERT", "BertEmbedding", "BertHead"]

NUM_SEGMENTS = 2


class BertEmbedding(NamedEmbedding):
    """Token + position + segment embeddings, normalised; passes the padding mask on."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)  # first: a tied head redraws it
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.seg = nn.Embedding(NUM_SEGMENTS, cfg.d_model)
        self.norm = make_norm(cfg)

    def forward(self, batch: State) -> State:
        """tokens, segments, attention_mask (B, T) -> hidden (B, T, D), attention_mask."""
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions) + self.seg(batch["segments"])
        return {"hidden": self.norm(x), "attention_mask": batch["attention_mask"]}


class BertHead(NamedHead):
    """Final norm; MLM logits over the vocabulary and next-sentence logits of the first token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_final_norm(cfg)
        self.transform = Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATION_FNS[cfg.act]
        self.transform_norm = make_norm(cfg)
        self.proj = Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        # replaced by vocabulary-parallel cross-entropy when tp splits the logits
        self.criterion: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum
        self.pooler = Linear(cfg.d_model, cfg.d_model)
        self.nsp = Linear(cfg.d_model, NUM_SEGMENTS)

    def forward(self, state: State) -> State:
        """hidden (B, T, D) -> logits (B, T, V) and nsp_logits (B, 2)."""
        x = self.norm(state["hidden"])
        h = self.transform_norm(self.act(self.transform(x)))
        pooled = torch.tanh(self.pooler(x[:, 0]))  # the first ([CLS]) token
        return {"logits": self.proj(h), "nsp_logits": self.nsp(pooled)}

    def loss(self, out: State, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed cross-entropy per term: ``mlm`` over masked positions, ``nsp`` if targeted."""
        sums = {"mlm": self.criterion(out["logits"], targets["mlm"])}
        if "nsp" in targets:
            sums["nsp"] = cross_entropy_sum(out["nsp_logits"], targets["nsp"])
        return sums


def _block(cfg: ModelConfig, index: int) -> nn.Module:
    if index == 0:
        return BertEmbedding(cfg)
    if index == cfg.num_blocks - 1:
        return PooledClassifier(cfg) if cfg.num_labels else BertHead(cfg)
    return EncoderLayer(cfg)


def _signature(cfg: ModelConfig, shapes: Shapes, after_block: int, *, tp: int = 1,
               sequence_parallel: bool = False) -> Signature:
    del after_block, tp, sequence_parallel  # every cut carries the same; tp is refused earlier
    batch, seq = shapes["tokens"]
    return {"hidden": TensorSpec((batch, seq, cfg.d_model), torch.float32),
            "attention_mask": TensorSpec((batch, seq), torch.int64, grad=False)}


def _example(cfg: ModelConfig, batch: int, seq: int, gen: torch.Generator) -> tuple[State, State]:
    tokens = torch.randint(cfg.vocab_size, (batch, seq), generator=gen)
    inputs = {"tokens": tokens, "segments": torch.zeros_like(tokens),
              "attention_mask": torch.ones_like(tokens)}
    targets = {"mlm": torch.randint(cfg.vocab_size, (batch, seq), generator=gen),
               "nsp": torch.randint(NUM_SEGMENTS, (batch,), generator=gen)}
    return inputs, targets


BERT = Family("bert", _block, _signature, *estimate_costs(_block), _example)
