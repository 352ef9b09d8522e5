"""Span corruption (T5): spans of a row replaced by sentinels; the target spells them out.

With ``noise`` of the tokens in spans of mean length ``mean_span``::

    row     a b c d e f g h
    input   a <s0> d e <s1> h <eos>          (then padding)
    target  <s0> b c <s1> f g <eos>          (then padding)

The decoder reads the target shifted right after a start token (teacher forcing). The
model's vocabulary is the tokenizer's plus pad (also the decoder's start), eos and
``sentinels`` sentinel ids (:class:`T5Specials`). Random choices come from the caller's
generator, so a batch is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conveyor.data.errors import DataError
from conveyor.data.mlm import IGNORE
from conveyor.data.special_ids import SpecialIds

__all__ = ["T5Specials", "corrupt_spans", "span_batch"]


@dataclass(frozen=True)
class T5Specials(SpecialIds):
    """Special ids after a tokenizer's ``base`` ids: pad (= decoder start), eos, sentinels;
    or ``given`` by the model's own tokenizer (HF T5: pad 0, eos 1, <extra_id_k> at the top)."""

    sentinels: int = 16

    @property
    def pad(self) -> int:
        """Padding, and the decoder's start token."""
        return self._id("pad", 0)

    @property
    def eos(self) -> int:
        """Ends the input and the target."""
        return self._id("eos", 1)

    def sentinel(self, k: int) -> int:
        """The id standing for the k-th corrupted span."""
        return self._id(f"sentinel_{k}", 2 + k)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's ids, pad, eos and the sentinels."""
        return self.base + 2 + self.sentinels


def corrupt_spans(
    row: np.ndarray, rng: np.random.Generator, specials: T5Specials, *, noise: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one row, each ending in eos."""
    n = len(row)
    n_noise = max(1, round(n * noise))
    n_spans = max(1, min(specials.sentinels, round(n_noise / mean_span), n - n_noise))
    # span starts: n_spans distinct positions, spans cut the noise count into n_spans parts
    cuts = np.sort(rng.choice(np.arange(1, n_noise), n_spans - 1, replace=False)) \
        if n_spans > 1 else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.concatenate([[0], cuts, [n_noise]]))
    gaps = np.sort(rng.choice(np.arange(1, n - n_noise + 1), n_spans, replace=False)) \
        if n - n_noise >= n_spans else np.arange(1, n_spans + 1)
    inp: list[int] = []
    tgt: list[int] = []
    pos = 0
    kept = 0
    for k in range(n_spans):
        keep_until = pos + (gaps[k] - kept)  # clean tokens before span k
        inp.extend(int(t) for t in row[pos:keep_until])
        kept = gaps[k]
        end = keep_until + int(lengths[k])
        inp.append(specials.sentinel(k))
        tgt.append(specials.sentinel(k))
        tgt.extend(int(t) for t in row[keep_until:end])
        pos = end
    inp.extend(int(t) for t in row[pos:])
    return inp + [specials.eos], tgt + [specials.eos]


def span_batch(
    rows: np.ndarray, indices: np.ndarray, src_len: int, tgt_len: int, specials: T5Specials,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Padded arrays: tokens, attention_mask (B, src_len); decoder_tokens, decoder_mask, lm (B, tgt_len).

    Padding (``specials.pad``) at the end of a row is dropped first, so rows of several
    lengths can share one array.
    """
    n = len(indices)
    out = {"tokens": np.full((n, src_len), specials.pad, dtype=np.int64),
           "decoder_tokens": np.full((n, tgt_len), specials.pad, dtype=np.int64),
           "lm": np.full((n, tgt_len), IGNORE, dtype=np.int64)}
    for i, row in enumerate(indices):
        tokens = rows[row]
        inp, tgt = corrupt_spans(tokens[tokens != specials.pad], rng, specials)
        if len(inp) > src_len or len(tgt) > tgt_len:
            raise DataError(f"a corrupted row needs {len(inp)} input and {len(tgt)} target "
                            f"tokens, more than src_len={src_len} / tgt_len={tgt_len}; use "
                            "shorter rows or longer lengths")
        out["tokens"][i, : len(inp)] = inp
        out["lm"][i, : len(tgt)] = tgt
        out["decoder_tokens"][i, : len(tgt)] = [specials.pad] + tgt[:-1]  # start, then shifted
    out["attention_mask"] = (out["tokens"] != specials.pad).astype(np.int64)
    out["decoder_mask"] = (out["lm"] != IGNORE).astype(np.int64)
    return out
