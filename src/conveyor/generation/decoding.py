"""Autoregressive decoding with KV caches: prefill the prompt once, then one token a step.

The loop (:func:`decode_loop`) is shared by the single-process :func:`generate` and
the pipelined one in :mod:`conveyor.runtime.generate`; only the step that turns the
newest positions into the next token differs. Both run the blocks through
:class:`CachedBlocks`, so a pipeline computes exactly what one process computes.

Length: a model sees at most ``max_seq_len`` positions. A prompt longer than that
is an error; otherwise generation stops early, without error, once the context is
full (:func:`context_budget` tells how many new tokens fit).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..log import get_logger
from ..models import EmbeddingBlock, HeadBlock, KVCache, Transformer, TransformerBlock
from ..models.layers import LeftPadding
from .sampling import GenerationError, check_sampling, sample_next

__all__ = [
    "CachedBlocks",
    "check_prompt",
    "context_budget",
    "decode_loop",
    "generate",
]

log = get_logger(__name__)

TokenCallback = Callable[[int], None]


def check_prompt(prompt_ids: Sequence[int] | Tensor, cfg: ModelConfig) -> list[int]:
    """The prompt as a list of ints; GenerationError if it is empty, too long or out of vocab."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise GenerationError("the prompt is empty; pass at least one token")
    if len(ids) > cfg.max_seq_len:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens but the model's max_seq_len is "
            f"{cfg.max_seq_len}; shorten the prompt to at most {cfg.max_seq_len} tokens"
        )
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(
            f"prompt token id {bad[0]} is outside the model's vocabulary (vocab_size="
            f"{cfg.vocab_size}); encode the prompt with the model's own tokenizer"
        )
    return ids


def context_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """How many of ``max_new_tokens`` fit: the last new token is never fed back in."""
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0")
    return max(0, min(max_new_tokens, max_seq_len - prompt_len + 1))


class CachedBlocks:
    """A contiguous run of blocks with one KV cache per transformer block.

    Called with the newest positions (token ids for a run that starts with the
    embedding, hidden states (B, T, D) otherwise), it returns hidden states
    (B, T, D), or the logits (B, V) of the last position when the run ends with
    the head (the head runs on that position only).
    """

    def __init__(
        self,
        blocks: Mapping[int, nn.Module],
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | None = None,
        padding: LeftPadding | None = None,
    ) -> None:
        self.blocks = dict(sorted(blocks.items()))
        self.padding = padding  # rows of unequal prompts, left-padded to one length
        dtype = next(next(iter(self.blocks.values())).parameters()).dtype
        self.caches = {
            i: KVCache.from_config(cfg, batch_size, max_len, dtype=dtype, device=device)
            for i, b in self.blocks.items()
            if isinstance(b, TransformerBlock)
        }
        for cache in self.caches.values():
            cache.padding = padding

    @classmethod
    def gather(cls, stacks: Sequence[CachedBlocks], picks: Sequence[tuple[int, int]]
               ) -> CachedBlocks:
        """Stacks over the same blocks whose row r is row ``picks[r][1]`` of ``stacks[picks[r][0]]``.

        Caches and padding move with their rows: how sequences change microbatch.
        """
        first = stacks[picks[0][0]]
        out = cls.__new__(cls)
        out.blocks = first.blocks
        out.padding = None
        if first.padding is not None:
            pad = torch.stack([stacks[m].padding.pad[r] for m, r in picks])  # type: ignore[union-attr]
            out.padding = LeftPadding(pad, first.padding.max_seq_len)
        out.caches = {}
        for i, cache in first.caches.items():
            new = copy.copy(cache)
            new.k = torch.stack([stacks[m].caches[i].k[r] for m, r in picks])
            new.v = torch.stack([stacks[m].caches[i].v[r] for m, r in picks])
            new.padding = out.padding
            out.caches[i] = new
        return out

    def __call__(self, x: Tensor, start_pos: int) -> Tensor:
        """Run the blocks in order on slots ``start_pos..``, filling the caches."""
        for i, block in self.blocks.items():
            if isinstance(block, EmbeddingBlock):
                x = block(x, start_pos, self.padding)  # (B, T, D)
            elif isinstance(block, TransformerBlock):
                x = block(x, self.caches[i], start_pos)  # (B, T, D)
            else:
                assert isinstance(block, HeadBlock), f"unexpected block {type(block).__name__}"
                x = block(x[:, -1:])[:, -1]  # (B, V)
        return x


def decode_loop(
    prompt_ids: list[int],
    budget: int,
    step: Callable[[list[int], int], int],
    *,
    stop_at_eot: bool,
    eot_id: int | None,
    on_token: TokenCallback | None,
) -> list[int]:
    """Call ``step(new_ids, start_pos) -> next id`` up to ``budget`` times; return the new ids.

    The first step gets the whole prompt (prefill), later ones the previous token.
    An end-of-text token ends the loop and is neither returned nor passed to
    ``on_token``.
    """
    out: list[int] = []
    chunk, pos = prompt_ids, 0
    for _ in range(budget):
        token = step(chunk, pos)
        pos += len(chunk)
        if stop_at_eot and eot_id is not None and token == eot_id:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        chunk = [token]
    return out


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_at_eot: bool = True,
    eot_id: int | None = None,
    on_token: TokenCallback | None = None,
) -> list[int]:
    """Continue one prompt; return the new token ids, streaming each through ``on_token``.

    Stops after ``max_new_tokens``, at ``eot_id`` (when ``stop_at_eot`` and an id is
    given; the end-of-text token is not returned), or when the context of
    ``max_seq_len`` positions is full, whichever comes first. A prompt longer than
    ``max_seq_len`` raises GenerationError. The same seed gives the same tokens.
    """
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    ids = check_prompt(prompt_ids, cfg)
    budget = context_budget(len(ids), max_new_tokens, cfg.max_seq_len)
    if budget < max_new_tokens:
        log.info("context full after %d new tokens (max_seq_len=%d)", budget, cfg.max_seq_len)
    if budget == 0:
        return []
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stack = CachedBlocks(dict(enumerate(model.blocks)), cfg, 1, len(ids) + budget - 1, device)

    def step(chunk: list[int], start_pos: int) -> int:
        tokens = torch.tensor([chunk], dtype=torch.long, device=device)  # (1, T)
        logits = stack(tokens, start_pos)  # (1, V)
        token = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        return int(token[0])

    return decode_loop(ids, budget, step, stop_at_eot=stop_at_eot, eot_id=eot_id,
                       on_token=on_token)
