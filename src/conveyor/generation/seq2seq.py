"""Encoder-decoder (T5) generation with caches: encode each source once, then decode.

A source is encoded once; every decoder layer then keeps its self-attention keys
and values (a :class:`~conveyor.models.layers.KVCache`) and the cross-attention's
keys and values over the encoder output, computed once from it. A decode step
feeds one token per sequence at decoder position ``t`` and computes what the full
model computes for that position (relative position biases included, as key -
query distances from ``t``).

Round 0 is the *prefill*: the source runs through the embedding, the encoder
layers and the bridge, and the decoder's start token through the decoder, in one
pass (:class:`Seq2SeqStack` on a state of named tensors); later rounds pass only the
newest decoder position. Sources of unequal length share a batch right-padded,
with a padding mask (relative biases depend on distances only, so each row
computes what its source alone computes); every row's decoder is at the same
position, so the decoder needs no padding. The pipelined version is
:class:`conveyor.runtime.seq2seq.Seq2SeqGenerator`; both run :class:`Seq2SeqStack`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..data.objectives import t5_specials
from ..models.families.t5 import T5Bridge, T5Embedding
from ..models.layers import KVCache
from ..models.stack import DecoderLayer, EncoderLayer, NamedHead, State
from .batch import Sampling, SequenceCallback, Tracker
from .decoding import check_prompt, context_budget
from .sampling import GenerationError

__all__ = ["ENCODER", "Seq2SeqBatch", "Seq2SeqStack", "generate_seq2seq", "output_ids",
           "seq2seq_sampling", "source_ids", "t5_specials"]

ENCODER = "encoder"
"""Round 0's encoder-side tensor between stages: the encoder stream before the bridge,
encoder_out after it (a stage knows which from its own blocks)."""


def output_ids(ids: Sequence[int], cfg: ModelConfig) -> list[int]:
    """An output without the family's special ids (pad, eos, sentinels): what to detokenize."""
    sp = t5_specials(cfg)  # the model's own ids (an import's) or those after the tokenizer's
    special = {sp.pad, sp.eos, *(sp.sentinel(k) for k in range(sp.sentinels))}
    return [t for t in ids if t not in special]


class Seq2SeqBatch:
    """Sources split in order into ``num_microbatches`` right-padded microbatches of one shape.

    Duck-types :class:`~conveyor.generation.batch.PromptBatch` for the
    :class:`~conveyor.generation.batch.Tracker` and the pipelined generator.
    """

    def __init__(self, sources: Sequence[Sequence[int]], max_new_tokens: int,
                 cfg: ModelConfig, num_microbatches: int) -> None:
        if not sources:
            raise GenerationError("no sources to generate from; pass at least one")
        self.prompts = [check_prompt(s, cfg) for s in sources]
        # decoder positions 0 (the start token) .. budget - 1 are fed in
        budget = context_budget(1, max_new_tokens, cfg.max_seq_len)
        self.budgets = [budget] * len(self.prompts)
        m = max(1, min(num_microbatches, len(self.prompts)))
        self.size = -(-len(self.prompts) // m)  # rows per microbatch
        self.num_microbatches = -(-len(self.prompts) // self.size)
        self.source_len = max(len(s) for s in self.prompts)
        self.max_budget = budget
        self.cache_len = max(budget, 1)  # decoder slots a self-attention cache holds
        self.specials = t5_specials(cfg)

    def rows(self, mb: int) -> list[int]:
        """Source index of each row of microbatch ``mb``; -1 for an idle row."""
        first = mb * self.size
        return [i if i < len(self.prompts) else -1 for i in range(first, first + self.size)]

    def tokens(self, rows: Sequence[int], device: torch.device) -> State:
        """Round 0's input: sources right-padded, their mask, the decoder's start token.

        An idle row is a one-token source (a row with no key would give NaN).
        """
        pad = self.specials.pad
        tokens = torch.full((len(rows), self.source_len), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), self.source_len, dtype=torch.long)
        for b, i in enumerate(rows):
            n = len(self.prompts[i]) if i >= 0 else 1
            if i >= 0:
                tokens[b, :n] = torch.tensor(self.prompts[i])
            mask[b, :n] = 1
        start = torch.full((len(rows), 1), pad, dtype=torch.long)
        return {"tokens": tokens.to(device), "attention_mask": mask.to(device),
                "decoder_tokens": start.to(device)}

    def slots(self, round_: int) -> tuple[int, int]:
        """(decoder position, count) round ``round_`` feeds in: one token each round."""
        return round_, 1


class Seq2SeqStack:
    """A contiguous run of t5 blocks with per-layer caches, for one microbatch.

    Called as ``stack(x, start)``: in round 0 (``start == 0``) ``x`` is a state (the
    batch's :meth:`Seq2SeqBatch.tokens` on the first stage, else ``hidden``,
    ``encoder`` and ``attention_mask`` from the previous stage) and a state of the
    same names is returned; later ``x`` is the newest decoder tokens (B, 1) or
    hidden states (B, 1, D). A run ending with the head returns logits (B, V).
    Encoder blocks only act in round 0; later they pass the decoder stream on.
    """

    def __init__(self, blocks: Mapping[int, nn.Module], batch_size: int, max_len: int,
                 device: torch.device | None = None) -> None:
        self.blocks = dict(sorted(blocks.items()))
        dtype = next(next(iter(self.blocks.values())).parameters()).dtype
        self.caches: dict[int, KVCache] = {}
        for i, b in self.blocks.items():
            if isinstance(b, DecoderLayer):
                heads, hd = b.attn.n_heads, b.attn.head_dim
                self.caches[i] = KVCache(batch_size, heads, max_len, hd, dtype=dtype,
                                         device=device)
        self.memory: dict[int, tuple[Tensor, Tensor]] = {}  # cross keys/values per layer
        self.source_mask: Tensor | None = None  # (B, S), set in round 0
        self.decoder_mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)

    @classmethod
    def gather(cls, stacks: Sequence[Seq2SeqStack], picks: Sequence[tuple[int, int]]
               ) -> Seq2SeqStack:
        """Stacks over the same blocks whose row r is row ``picks[r][1]`` of ``stacks[picks[r][0]]``."""
        first = stacks[picks[0][0]]
        out = cls.__new__(cls)
        out.blocks = first.blocks

        def rows(get: Callable[[Seq2SeqStack], Tensor]) -> Tensor:
            return torch.stack([get(stacks[m])[r] for m, r in picks])

        out.caches = {}
        for i, cache in first.caches.items():
            new = copy.copy(cache)
            new.k = rows(lambda s, i=i: s.caches[i].k)
            new.v = rows(lambda s, i=i: s.caches[i].v)
            out.caches[i] = new
        out.memory = {i: (rows(lambda s, i=i: s.memory[i][0]), rows(lambda s, i=i: s.memory[i][1]))
                      for i in first.memory}
        out.source_mask = None if first.source_mask is None else rows(lambda s: s.source_mask)
        out.decoder_mask = first.decoder_mask[: len(picks)]
        return out

    def __call__(self, x: Tensor | State, start: int) -> Tensor | State:
        """Run the blocks on decoder position ``start`` (round 0: the source too)."""
        if isinstance(x, Tensor):
            return self._step(x, start)
        return self._prefill(x)

    def _prefill(self, state: State) -> Tensor | State:
        mask = state["attention_mask"]
        enc, dec = state.get(ENCODER), state.get("hidden")
        self.source_mask = mask
        for i, block in self.blocks.items():
            if isinstance(block, T5Embedding):
                enc, dec = block.embed(state["tokens"]), block.embed(state["decoder_tokens"])
            elif isinstance(block, EncoderLayer):
                enc = block({"hidden": enc, "attention_mask": mask})["hidden"]
            elif isinstance(block, T5Bridge):
                enc = block.encoder_out(enc)
            elif isinstance(block, DecoderLayer):
                self.memory[i] = block.cross.project_keys(enc)  # once per source
                dec = self._decode(i, block, dec, 0)
            else:
                assert isinstance(block, NamedHead), f"unexpected block {type(block).__name__}"
                return self._logits(block, dec)
        return {"hidden": dec, ENCODER: enc, "attention_mask": mask}  # type: ignore[dict-item]

    def _step(self, x: Tensor, start: int) -> Tensor:
        for i, block in self.blocks.items():
            if isinstance(block, T5Embedding):
                x = block.embed(x)
            elif isinstance(block, DecoderLayer):
                x = self._decode(i, block, x, start)
            elif isinstance(block, NamedHead):
                return self._logits(block, x)
        return x  # encoder blocks and the bridge pass the decoder stream on

    def _decode(self, i: int, block: DecoderLayer, x: Tensor, start: int) -> Tensor:
        assert self.source_mask is not None, "round 0 (the source) runs first"
        end = start + x.shape[1]
        return block.decode(x, start, self.caches[i], self.decoder_mask[: x.shape[0], :end],
                            self.memory[i], self.source_mask)

    @staticmethod
    def _logits(head: nn.Module, x: Tensor) -> Tensor:
        return head({"hidden": x[:, -1:]})[:, -1]  # (B, V): the newest position only


def source_ids(ids: Sequence[int], cfg: ModelConfig) -> list[int]:
    """A tokenized source as the encoder reads it: ending in eos, as in training.

    GenerationError if that is longer than the model's ``max_seq_len``.
    """
    if len(ids) + 1 > cfg.max_seq_len:
        raise GenerationError(
            f"the source has {len(ids)} tokens; with the eos the encoder reads after it that "
            f"is more than the model's max_seq_len={cfg.max_seq_len}: shorten it to at most "
            f"{cfg.max_seq_len - 1} tokens")
    return [*ids, t5_specials(cfg).eos]


def seq2seq_sampling(sampling: Sampling, cfg: ModelConfig) -> Sampling:
    """``sampling`` stopping at T5's eos unless it names another end token."""
    if sampling.eot_id is not None:
        return sampling
    return Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                    sampling.stop_at_eot, t5_specials(cfg).eos)


@torch.no_grad()
def generate_seq2seq(
    blocks: Mapping[int, nn.Module] | Sequence[nn.Module],
    cfg: ModelConfig,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    *,
    on_token: SequenceCallback | None = None,
) -> list[list[int]]:
    """Each source's output ids, in one process: the whole model, the sources as one batch.

    A finished sequence leaves the batch at once (its rows and caches dropped).

    Stops a sequence at T5's eos (unless ``sampling.eot_id`` names another; not
    returned), after ``max_new_tokens`` or when ``max_seq_len`` decoder positions are
    used. ``on_token(source, id)`` sees each token as it is chosen.
    """
    blocks = dict(blocks.items() if isinstance(blocks, Mapping) else enumerate(blocks))
    sampling = seq2seq_sampling(sampling, cfg)
    batch = Seq2SeqBatch(sources, max_new_tokens, cfg, 1)
    tracker = Tracker(batch, sampling, on_token)  # type: ignore[arg-type]
    device = next(next(iter(blocks.values())).parameters()).device
    stack = Seq2SeqStack(blocks, batch.size, batch.cache_len, device)
    generators = {i: torch.Generator(device=device).manual_seed(sampling.seed)
                  for i in range(len(batch.prompts)) if sampling.temperature > 0}
    for round_ in range(batch.max_budget):
        picks = tracker.regroup(1)  # finished sequences leave; caches follow the others
        if not tracker.layout:
            break
        if picks:
            stack = Seq2SeqStack.gather([stack], picks[0])
        rows = tracker.layout[0]
        x = batch.tokens(rows, device) if round_ == 0 else tracker.newest(0, device)
        tokens = sampling.sample(stack(x, round_), [generators.get(i) for i in rows])
        tracker.add(0, round_, tokens)
    return tracker.out
