"""Losses as sums over target tokens, normalised by the target count of the whole global batch.

Every objective's head returns, per term (``lm``, ``mlm``, ``nsp``, ...), the *sum* of
its per-target losses over one microbatch; targets equal to :data:`IGNORE_INDEX` do
not count. The step loss is ``sum_term(total_term / count_term)`` where ``count_term``
counts the targets of that term in the whole global batch (all microbatches, all
data-parallel replicas). A microbatch's share is its sums over those global counts, so
the summed grads equal the single-process batch's whatever the microbatching, even when
microbatches hold different numbers of targets (masked LM, span corruption, padding).

A term is named after its target tensor: a single target tensor is the term
:data:`SINGLE`; a dict of targets has one term per entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "SINGLE", "Targets", "cross_entropy_sum", "normalise", "target_counts"]

IGNORE_INDEX = -100
"""A target that takes no part in the loss (and is not counted)."""

SINGLE = "targets"
"""The term name of an objective whose targets are one tensor."""

Targets = Tensor | Mapping[str, Tensor]
"""One target tensor, or named target tensors (one loss term each)."""


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of logits (..., V) against targets (...), ignored ones left out, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _terms(x: Tensor | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return {SINGLE: x} if isinstance(x, Tensor) else x


def target_counts(targets: Targets) -> dict[str, int]:
    """Targets that count (not IGNORE_INDEX), per term."""
    return {name: int((t != IGNORE_INDEX).sum()) for name, t in _terms(targets).items()}


def normalise(sums: Tensor | Mapping[str, Tensor], denominators: Mapping[str, float]) -> Tensor:
    """The loss: each term's sum over its denominator (its global target count), added up."""
    terms = _terms(sums)
    missing = set(terms) - set(denominators)
    if missing:
        raise ValueError(f"loss terms {sorted(missing)} have no target count; the head's terms "
                         f"must be named after the targets ({sorted(denominators)})")
    total: Tensor | None = None
    for name, value in terms.items():
        part = value / denominators[name]
        total = part if total is None else total + part
    assert total is not None, "an objective has at least one term"
    return total
