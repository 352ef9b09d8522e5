"""Masked-LM examples: sentence pairs from packed rows, and BERT's 80/10/10 masking.

The model's vocabulary is the tokenizer's plus four special ids after it
(:class:`BertSpecials`). An example is ``[CLS] A [SEP] B [SEP]`` then padding, with
segment 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``. A is the start of a row; B is its
continuation (label 0) or, half the time, a piece of another row (label 1: random).
Every random choice comes from a generator seeded by the caller (seed, step), so a
batch is a pure function of its seed: a resumed run sees the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conveyor.data.errors import DataError
from conveyor.data.special_ids import SpecialIds

__all__ = ["BertSpecials", "IGNORE", "mask_tokens", "sentence_pairs"]

IGNORE = -100
"""A target left out of the loss (``models.objective.IGNORE_INDEX``)."""


@dataclass(frozen=True)
class BertSpecials(SpecialIds):
    """[PAD], [CLS], [SEP], [MASK] after a tokenizer's ``base`` ids (random replacements are
    drawn below it), or ``given`` by the model's tokenizer."""

    @property
    def pad(self) -> int:
        """Padding (attention mask 0)."""
        return self._id("pad", 0)

    @property
    def cls(self) -> int:
        """First token; the next-sentence head reads it."""
        return self._id("cls", 1)

    @property
    def sep(self) -> int:
        """Ends each sentence."""
        return self._id("sep", 2)

    @property
    def mask(self) -> int:
        """Replaces 80% of the chosen tokens."""
        return self._id("mask", 3)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's ids and these four."""
        return self.base + 4

    def maskable(self, tokens: np.ndarray) -> np.ndarray:
        """Which tokens masking may choose: never a special token or padding."""
        if not self.given:
            return tokens < self.base  # the specials are the ids from base on
        return ~np.isin(tokens, [self.pad, self.cls, self.sep, self.mask])


def mask_tokens(
    tokens: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *, mask_id: int,
    random_below: int, prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels): ``prob`` of the maskable tokens chosen; of those 80% -> mask_id,
    10% -> a random id in [0, random_below), 10% kept. Labels hold the original token at
    chosen positions and IGNORE elsewhere."""
    chosen = (rng.random(tokens.shape) < prob) & maskable
    how = rng.random(tokens.shape)
    random_ids = rng.integers(0, random_below, tokens.shape)
    inputs = np.where(chosen & (how < 0.8), mask_id, tokens)
    inputs = np.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    labels = np.where(chosen, tokens, IGNORE)
    return inputs.astype(np.int64), labels.astype(np.int64)


def sentence_pairs(
    rows: np.ndarray, indices: np.ndarray, seq_len: int, specials: BertSpecials,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Next-sentence pairs from ``rows[indices]``: tokens, segments, attention_mask, nsp.

    A takes a random share of the ``seq_len - 3`` body tokens; B the rest of the same
    row (nsp 0) or the same number of tokens from a random row (nsp 1). One example in
    eight drops part of B, so batches hold padding.
    """
    body = seq_len - 3
    if body < 2:
        raise DataError(f"seq_len={seq_len} leaves no room for two sentences and 3 special "
                        "tokens; pass --seq-len >= 5")
    if rows.shape[1] < body:
        raise DataError(f"rows of {rows.shape[1]} tokens are shorter than {body}; pack with a "
                        "longer seq_len")
    n = len(indices)
    tokens = np.full((n, seq_len), specials.pad, dtype=np.int64)
    segments = np.zeros((n, seq_len), dtype=np.int64)
    nsp = (rng.random(n) < 0.5).astype(np.int64)
    for i, row in enumerate(indices):
        a_len = int(rng.integers(1, body))
        b_len = body - a_len
        a = rows[row, :a_len]
        if nsp[i]:
            other = int(rng.integers(0, len(rows)))
            start = int(rng.integers(0, rows.shape[1] - b_len + 1))
            b = rows[other, start : start + b_len]
        else:
            b = rows[row, a_len:body]
        if rng.random() < 0.125:
            b = b[: max(1, len(b) // 2)]
        example = np.concatenate([[specials.cls], a, [specials.sep], b, [specials.sep]])
        tokens[i, : len(example)] = example
        segments[i, a_len + 2 : len(example)] = 1
    mask = (tokens != specials.pad).astype(np.int64)
    return {"tokens": tokens, "segments": segments, "attention_mask": mask, "nsp": nsp}
