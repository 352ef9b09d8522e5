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
keeps its row until the current segment of rounds ends; then it leaves its slot:
the :class:`Tracker` lays the unfinished sequences out again in as few
microbatches as the run allows (:meth:`Tracker.regroup`), and their KV caches
follow them (:meth:`CachedBlocks.gather <conveyor.generation.decoding.CachedBlocks.gather>`).
Generation stops when no sequence is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..models.layers import LeftPadding
from .decoding import check_prompt, context_budget
from .sampling import GenerationError, check_sampling, sample_next

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
        """Next ids (B,) from logits (B, V), row ``b`` drawing from ``generators[b]``.

        A row without a generator (an idle row) takes the most likely token.
        """
        greedy = logits.argmax(dim=-1)
        if self.temperature == 0:
            return greedy
        rows = [greedy[b : b + 1] if g is None else
                sample_next(logits[b : b + 1], temperature=self.temperature, top_k=self.top_k,
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
            raise GenerationError("no prompts to generate from; pass at least one")
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

    def tokens(self, rows: Sequence[int], device: torch.device) -> Tensor:
        """The prompts of ``rows`` (prompt indices, -1 idle), left-padded with 0: (rows, prompt_len)."""
        out = torch.zeros(len(rows), self.prompt_len, dtype=torch.long)
        for b, i in enumerate(rows):
            if i >= 0:
                out[b, self.prompt_len - len(self.prompts[i]):] = torch.tensor(self.prompts[i])
        return out.to(device)

    def padding(self, rows: Sequence[int], device: torch.device) -> LeftPadding:
        """Where each of ``rows`` starts (an idle row is all padding but its last slot)."""
        pad = [self.prompt_len - (len(self.prompts[i]) if i >= 0 else 1) for i in rows]
        return LeftPadding(torch.tensor(pad, dtype=torch.long, device=device), self.max_seq_len)

    def slots(self, round_: int) -> tuple[int, int]:
        """(first slot, slot count) that round ``round_`` feeds in: the prompt, then one token."""
        if round_ == 0:
            return 0, self.prompt_len
        return self.prompt_len + round_ - 1, 1


class Tracker:
    """Each sequence's new tokens, which have finished, and which row each holds now.

    Every rank keeps one and feeds it the same tokens, so all agree on the layout.
    """

    def __init__(
        self, batch: PromptBatch, sampling: Sampling, on_token: SequenceCallback | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        self.batch = batch
        self.sampling = sampling
        self.on_token = on_token
        self.on_done = on_done  # called with a prompt's index once it has finished
        self.out: list[list[int]] = [[] for _ in batch.prompts]
        self.done = [False] * len(batch.prompts)
        for i, budget in enumerate(batch.budgets):
            if budget == 0:
                self._finish(i)
        self.rounds = [0] * len(batch.prompts)  # rounds recorded per sequence
        self.last = [0] * len(batch.prompts)  # each sequence's newest token
        # prompt index of each row of each microbatch (-1: idle row)
        self.layout = [batch.rows(mb) for mb in range(batch.num_microbatches)]

    def add(self, mb: int, round_: int, tokens: Tensor) -> None:
        """Record round ``round_``'s tokens (size,) of microbatch ``mb``; repeats are ignored."""
        s = self.sampling
        for i, token in zip(self.layout[mb], tokens.tolist(), strict=True):
            if i < 0 or self.done[i] or round_ < self.rounds[i]:
                continue
            assert round_ == self.rounds[i], f"round {round_} of sequence {i} came early"
            self.rounds[i] += 1
            self.last[i] = token
            if s.stop_at_eot and s.eot_id is not None and token == s.eot_id:
                self._finish(i)
                continue
            self.out[i].append(token)
            if self.on_token is not None:
                self.on_token(i, token)
            if len(self.out[i]) >= self.batch.budgets[i]:
                self._finish(i)

    def _finish(self, i: int) -> None:
        self.done[i] = True
        if self.on_done is not None:
            self.on_done(i)

    def newest(self, mb: int, device: torch.device) -> Tensor:
        """The newest token of each row of microbatch ``mb``: (size, 1), the next round's input."""
        return torch.tensor([[self.last[i] if i >= 0 else 0] for i in self.layout[mb]],
                            device=device)

    def regroup(self, max_microbatches: int) -> list[list[tuple[int, int]]] | None:
        """Lay the unfinished sequences out again, or None if the layout stays as it is.

        They keep their order, in at most ``max_microbatches`` microbatches of one
        size; the last is filled with idle rows (copies of a live row's slot, whose
        tokens are ignored). Returns, per new row, its (old microbatch, old row).
        """
        where = {i: (mb, r) for mb, rows in enumerate(self.layout) for r, i in enumerate(rows)
                 if i >= 0 and not self.done[i]}
        live = list(where)
        if not any(i >= 0 and self.done[i] for rows in self.layout for i in rows):
            return None  # nobody finished since the last layout
        if not live:
            self.layout = []
            return []
        m = min(max_microbatches, len(live))
        size = -(-len(live) // m)
        rows = [live[k:k + size] for k in range(0, len(live), size)]
        rows[-1] += [-1] * (size - len(rows[-1]))
        self.layout = rows
        return [[where[i if i >= 0 else live[0]] for i in mb_rows] for mb_rows in rows]

    def rounds_left(self) -> int:
        """Rounds until every unfinished sequence has used its budget."""
        return max((self.batch.budgets[i] - len(self.out[i]) for rows in self.layout
                    for i in rows if i >= 0 and not self.done[i]), default=0)
