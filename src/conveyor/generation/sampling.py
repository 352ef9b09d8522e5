"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

The filters apply in the usual order: divide by the temperature, keep the ``top_k``
most likely tokens, then keep the smallest set of those whose probability mass
reaches ``top_p``; the token is drawn from what is left with a seeded
``torch.Generator``, so the same seed gives the same tokens on any run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GenerationError", "check_sampling", "sample_next"]


class GenerationError(ValueError):
    """A generation setting or prompt is invalid; the message names the value and the fix."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise GenerationError unless the sampling settings make sense."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(
            f"temperature={temperature} must be a finite number >= 0 (0 picks the most "
            "likely token)"
        )
    if top_k is not None and (isinstance(top_k, bool) or top_k < 0):
        raise GenerationError(f"top_k={top_k} must be >= 0 (0 or None keeps every token)")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p} must be in (0, 1] (1 or None keeps every token)")


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V); ``temperature=0`` is greedy (argmax).

    ``top_k`` of 0 or None and ``top_p`` of 1 or None switch those filters off.
    """
    check_sampling(temperature, top_k, top_p)
    if logits.ndim != 2:
        raise GenerationError(
            f"logits have shape {tuple(logits.shape)}; pass (batch, vocab) logits of one position"
        )
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # (B, V)
    if top_k and top_k < scores.shape[-1]:
        # Exactly k tokens survive, even when several tie with the k-th
        kept = torch.topk(scores, top_k, dim=-1)
        scores = torch.full_like(scores, -math.inf).scatter(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A token stays while the more likely ones hold less than top_p: the most
        # likely token always stays
        ordered = ordered.masked_fill(mass_before >= top_p, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(-1, order, ordered)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
