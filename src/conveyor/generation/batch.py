"""Many prompts at once: left-padded microbatches, per-sequence sampling and stopping.

A batch of prompts is split, in order, into microbatches of equal size (the last
one filled with idle rows), each left-padded to the longest prompt of the batch
so every microbatch crosses stage boundaries with one shape. Slot ``j`` of a row
with ``pad`` slots of padding is position ``j - pad``
(:class:`~conveyor.models.layers.LeftPadding`), so each row computes what its
prompt computes alone. Each sequence draws from its own generator seeded with the
run's seed, so its tokens do not depend on which other prompts share the batch:
a prompt generated in a batch gives what it gives alone, sampled or greedy (up to
float rounding between batched and single matmuls).

A sequence that finishes (end-of-text, its token budget, or a full context)
keeps its row until its whole microbatch has finished; the generation loop then
drops that microbatch, and stops when none is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..models.layers import LeftPadding
from .decoding import check_prompt, context_budget
from .sampling import check_sampling, sample_next

__all__ = ["PromptBatch", "Sampling", "Tracker"]

SequenceCallback = Callable[[int, int], None]
"""Called with (prompt index, token id) for each new token, in order per prompt."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when a sequence stops."""

    temperature: float = 0.8
    """0 picks the most likely token."""
    top_k: int | None = 50
    """Keep the k most likely tokens (0 or None: all)."""
    top_p: float | None = 0.95
    """Keep the most likely tokens holding this probability mass (1 or None: all)."""
    seed: int = 0
    """Every sequence's generator starts from this seed."""
    stop_at_eot: bool = True
    """Stop a sequence at ``eot_id`` (not returned)."""
    eot_id: int | None = None
    """The end-of-text token id, if any."""

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)

    def sample(self, logits: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
        """Next ids (B,) from logits (B, V), row ``b`` drawing from ``generators[b]``."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        rows = [sample_next(logits[b : b + 1], temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, generator=g)
                for b, g in enumerate(generators)]
        return torch.cat(rows)


class PromptBatch:
    """Prompts split into ``num_microbatches`` left-padded microbatches of one shape."""

    def __init__(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig,
        num_microbatches: int,
    ) -> None:
        if not prompts:
            raise ValueError("no prompts to generate from; pass at least one")
        self.prompts = [check_prompt(p, cfg) for p in prompts]
        self.budgets = [context_budget(len(p), max_new_tokens, cfg.max_seq_len)
                        for p in self.prompts]
        m = max(1, min(num_microbatches, len(self.prompts)))
        self.size = -(-len(self.prompts) // m)  # rows per microbatch
        self.num_microbatches = -(-len(self.prompts) // self.size)
        self.prompt_len = max(len(p) for p in self.prompts)
        self.max_budget = max(self.budgets)
        # slots a cache holds: the prompt, then every new token but the last
        self.cache_len = self.prompt_len + max(self.max_budget - 1, 0)
        self.max_seq_len = cfg.max_seq_len

    def rows(self, mb: int) -> list[int]:
        """Prompt index of each row of microbatch ``mb``; -1 for an idle row."""
        first = mb * self.size
        return [i if i < len(self.prompts) else -1 for i in range(first, first + self.size)]

    def tokens(self, mb: int, device: torch.device) -> Tensor:
        """The microbatch's prompts, left-padded with token 0: (size, prompt_len)."""
        out = torch.zeros(self.size, self.prompt_len, dtype=torch.long)
        for b, i in enumerate(self.rows(mb)):
            if i >= 0:
                out[b, self.prompt_len - len(self.prompts[i]):] = torch.tensor(self.prompts[i])
        return out.to(device)

    def padding(self, mb: int, device: torch.device) -> LeftPadding:
        """Where each row of microbatch ``mb`` starts (an idle row is all padding but its last slot)."""
        pad = [self.prompt_len - (len(self.prompts[i]) if i >= 0 else 1) for i in self.rows(mb)]
        return LeftPadding(torch.tensor(pad, dtype=torch.long, device=device), self.max_seq_len)

    def slots(self, round_: int) -> tuple[int, int]:
        """(first slot, slot count) that round ``round_`` feeds in: the prompt, then one token."""
        if round_ == 0:
            return 0, self.prompt_len
        return self.prompt_len + round_ - 1, 1


class Tracker:
    """Each sequence's new tokens so far, and which have finished (the same on every rank)."""

    def __init__(
        self, batch: PromptBatch, sampling: Sampling, on_token: SequenceCallback | None = None
    ) -> None:
        self.batch = batch
        self.sampling = sampling
        self.on_token = on_token
        self.out: list[list[int]] = [[] for _ in batch.prompts]
        self.done = [b == 0 for b in batch.budgets]
        self.next_round = [0] * batch.num_microbatches
        self.last: dict[int, Tensor] = {}  # microbatch -> its newest tokens (size,)

    def add(self, mb: int, round_: int, tokens: Tensor) -> None:
        """Record round ``round_``'s tokens (size,) of microbatch ``mb``; repeats are ignored."""
        if round_ < self.next_round[mb]:
            return
        assert round_ == self.next_round[mb], f"round {round_} of microbatch {mb} came early"
        self.next_round[mb] += 1
        self.last[mb] = tokens
        s = self.sampling
        for i, token in zip(self.batch.rows(mb), tokens.tolist(), strict=True):
            if i < 0 or self.done[i]:
                continue
            if s.stop_at_eot and s.eot_id is not None and token == s.eot_id:
                self.done[i] = True
                continue
            self.out[i].append(token)
            if self.on_token is not None:
                self.on_token(i, token)
            self.done[i] = len(self.out[i]) >= self.batch.budgets[i]

    def finished(self, mb: int) -> bool:
        """True once every sequence of microbatch ``mb`` has finished."""
        return all(i < 0 or self.done[i] for i in self.batch.rows(mb))

    def rounds_left(self, mbs: Sequence[int]) -> int:
        """Rounds until every unfinished sequence of ``mbs`` has used its budget."""
        return max((self.batch.budgets[i] - len(self.out[i]) for mb in mbs
                    for i in self.batch.rows(mb) if i >= 0 and not self.done[i]), default=0)
