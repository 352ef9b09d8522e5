"""Pipelined encoder-decoder (T5) generation on the executor: encode once, then decode rounds.

The same ring of forward-only schedules as decoder generation
(:class:`~conveyor.runtime.generate.PipelinedGenerator`, whose machinery this
reuses), over the training partition of the one chain (embedding | encoder layers |
bridge | decoder layers | head). Round 0 is the prefill: each microbatch's sources
run through the encoder stages and the bridge, and the decoder's start token
through the decoder stages, in one pass; what crosses a cut then is the decoder
stream ``hidden`` (B, 1, D), ``encoder`` (B, S, D: the encoder stream up to the
bridge, ``encoder_out`` after it) and the source's ``attention_mask``. Every decoder
stage computes its layers' cross-attention keys and values from ``encoder_out``
once, keeps them with the source mask beside its self-attention caches, and passes
``encoder_out`` on to the next decoder stage. Later rounds carry ``hidden`` (B, 1, D)
alone. A stage holding only encoder blocks has nothing to compute in those rounds:
it hands the decoder stream on (the first stage also embeds the newest tokens, its
table being the shared one), an idle hop in each round's ring. Finished sequences
leave their rows between segments, their caches (self, cross, source mask) moving
with them, as in decoder generation.

Every tensor between ranks moves through the executor and its point-to-point layer
(timeouts, NCCL-semantics mode, recorded timelines): this module sends nothing itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ModelConfig
from ..generation.batch import Sampling
from ..generation.seq2seq import ENCODER, Seq2SeqBatch, Seq2SeqStack, seq2seq_sampling
from ..models.boundary import Signature, TensorSpec
from ..models.families import family_of
from .generate import PipelinedGenerator

__all__ = ["Seq2SeqGenerator", "generator_class"]


class Seq2SeqGenerator(PipelinedGenerator):
    """This rank's stage of an encoder-decoder, generating outputs for batches of sources.

    Constructed and called like :class:`PipelinedGenerator` (a collective call on
    every pipeline rank, or with no mesh for the whole model in one process);
    ``generate(sources, ...)`` returns each source's output ids. A sequence stops at
    T5's eos unless ``sampling.eot_id`` names another end token.
    """

    def _sampling(self, sampling: Sampling) -> Sampling:
        return seq2seq_sampling(sampling, self.cfg)

    def _batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               microbatches: int) -> Seq2SeqBatch:  # type: ignore[override]
        return Seq2SeqBatch(prompts, max_new_tokens, self.cfg, microbatches)

    def _stack(self, batch: Seq2SeqBatch, rows: Sequence[int]) -> Seq2SeqStack:  # type: ignore[override]
        return Seq2SeqStack(self.blocks, len(rows), batch.cache_len, self.device)

    def _hidden_signature(self, batch: Seq2SeqBatch, size: int, round_: int,  # type: ignore[override]
                          boundary: int) -> Signature:
        del boundary  # every cut of a round carries the same names
        hidden = {"hidden": TensorSpec((size, 1, self.cfg.d_model), torch.float32)}
        if round_ > 0:
            return hidden
        source = (size, batch.source_len)
        return {**hidden, ENCODER: TensorSpec((*source, self.cfg.d_model), torch.float32),
                "attention_mask": TensorSpec(source, torch.int64, grad=False)}


def generator_class(cfg: ModelConfig) -> type[PipelinedGenerator]:
    """The generator for ``cfg``'s family: sources -> outputs for an encoder-decoder, else prompts."""
    return Seq2SeqGenerator if family_of(cfg).seq2seq else PipelinedGenerator
