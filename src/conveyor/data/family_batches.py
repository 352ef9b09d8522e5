"""Torch batches of the encoder (masked LM + NSP) and encoder-decoder (span corruption) objectives.

Each takes packed rows, the sampled row indices and a seed, and returns the named
``(inputs, targets)`` the family's blocks and head read (``models/families``). The
randomness comes from ``default_rng([seed, salt])``: the same call gives the same batch.
"""

from __future__ import annotations

import numpy as np
import torch

from conveyor.data.mlm import BertSpecials, mask_tokens, sentence_pairs
from conveyor.data.spans import T5Specials, span_batch

__all__ = ["mlm_batch", "span_corruption_batch"]

Named = dict[str, torch.Tensor]


def mlm_batch(
    rows: np.ndarray, indices: np.ndarray, seq_len: int, specials: BertSpecials, seed: int,
    salt: int, *, nsp: bool = True,
) -> tuple[Named, Named]:
    """Inputs tokens, segments, attention_mask; targets mlm (and nsp)."""
    rng = np.random.default_rng([seed, salt])
    pairs = sentence_pairs(rows, indices, seq_len, specials, rng)
    maskable = specials.maskable(pairs["tokens"])
    inputs, labels = mask_tokens(pairs["tokens"], maskable, rng, mask_id=specials.mask,
                                 random_below=specials.base)
    x = {"tokens": inputs, "segments": pairs["segments"], "attention_mask": pairs["attention_mask"]}
    y = {"mlm": labels, **({"nsp": pairs["nsp"]} if nsp else {})}
    return ({k: torch.from_numpy(v) for k, v in x.items()},
            {k: torch.from_numpy(v) for k, v in y.items()})


def span_corruption_batch(
    rows: np.ndarray, indices: np.ndarray, src_len: int, tgt_len: int, specials: T5Specials,
    seed: int, salt: int,
) -> tuple[Named, Named]:
    """Inputs tokens, attention_mask, decoder_tokens, decoder_mask; target lm."""
    rng = np.random.default_rng([seed, salt])
    arrays = {k: torch.from_numpy(v) for k, v in
              span_batch(rows, indices, src_len, tgt_len, specials, rng).items()}
    lm = arrays.pop("lm")
    return arrays, {"lm": lm}
