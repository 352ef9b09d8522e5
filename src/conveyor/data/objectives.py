"""Each family's pretraining batches from packed rows: causal LM, masked LM + NSP, span corruption.

A family's special ids (mask, separators, sentinels) sit after the tokenizer's own ids,
so the tokenizer is trained with ``vocab_size - special_count(model)`` ids and the
model keeps the configured ``vocab_size`` -- unless the model names its own
(``ModelConfig.special_ids``: an imported Hugging Face model's, from its tokenizer).
Rows are packed a little shorter than ``max_seq_len`` where an example adds tokens
around them (``packed_seq_len``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from conveyor.config import ModelConfig
from conveyor.data.batches import get_batch
from conveyor.data.errors import DataError
from conveyor.data.family_batches import mlm_batch, span_corruption_batch
from conveyor.data.mlm import BertSpecials
from conveyor.data.spans import T5Specials

__all__ = ["BatchMaker", "batch_maker", "bert_specials", "t5_specials", "check_objective", "packed_seq_len", "special_count",
           "span_target_len"]

BatchMaker = Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]]
"""(rows, row indices, salt) -> (inputs, targets) of one batch; the salt seeds its masks."""

SENTINELS = 16
"""Sentinel ids of span corruption: at most this many spans per row."""

_SPECIALS = {"gpt": 0, "bert": BertSpecials(0).vocab_size, "t5": T5Specials(0, SENTINELS).vocab_size}
# tokens an example adds around a packed row (which is max_seq_len - that + 1 long)
_ADDED = {"gpt": 0, "bert": 4, "t5": 2}
_MIN_SEQ = {"gpt": 1, "bert": 5, "t5": 4}  # bert: [CLS] a [SEP] b [SEP]; t5: a span and a row
_TOKENIZER_MIN = 257  # train_tokenizer's floor: 256 byte tokens + the end-of-text token


def check_objective(model: ModelConfig) -> None:
    """DataError naming the flag if the family's examples do not fit the vocabulary or length."""
    extra = special_count(model)
    if model.vocab_size - extra < _TOKENIZER_MIN:
        specials = f" plus the {extra} special ids family={model.family!r} adds" if extra else ""
        raise DataError(f"vocab_size={model.vocab_size} is too small: a trained tokenizer has "
                        f"{_TOKENIZER_MIN} ids or more{specials}; use --vocab-size >= "
                        f"{_TOKENIZER_MIN + extra}")
    if model.max_seq_len < _MIN_SEQ[model.family]:
        raise DataError(f"seq_len={model.max_seq_len} is too short for family="
                        f"{model.family!r} examples; use --seq-len >= {_MIN_SEQ[model.family]}")


def special_count(model: ModelConfig) -> int:
    """Ids the family reserves after the tokenizer's (none when the model names its own)."""
    return 0 if model.special_ids else _SPECIALS[model.family]


def bert_specials(model: ModelConfig) -> BertSpecials:
    """The masked-LM special ids of ``model``: its own (``special_ids``) or after the tokenizer's."""
    return BertSpecials(model.vocab_size - special_count(model),
                        given=tuple((model.special_ids or {}).items()))


def t5_specials(model: ModelConfig) -> T5Specials:
    """The span-corruption special ids of ``model``: its own or after the tokenizer's."""
    named = sum(1 for name in model.special_ids or {} if name.startswith("sentinel_"))
    return T5Specials(model.vocab_size - special_count(model), named or SENTINELS,
                      given=tuple((model.special_ids or {}).items()))


def packed_seq_len(model: ModelConfig) -> int:
    """The ``seq_len`` to pack rows with (rows hold one token more)."""
    return model.max_seq_len - _ADDED[model.family]


def span_target_len(row_len: int) -> int:
    """Longest span-corruption target of a row: its noise, one sentinel per span, and eos."""
    noise = max(1, round(row_len * 0.15))
    return 2 * noise + 1


def batch_maker(model: ModelConfig, seed: int) -> BatchMaker:
    """How the trainer turns sampled rows into the family's (inputs, targets)."""
    if model.family == "bert":
        bert = bert_specials(model)
        return lambda rows, idx, salt: mlm_batch(rows, idx, model.max_seq_len, bert, seed, salt)
    if model.family == "t5":
        t5 = t5_specials(model)

        def spans(rows: np.ndarray, idx: np.ndarray, salt: int) -> tuple[Any, Any]:
            return span_corruption_batch(rows, idx, model.max_seq_len,
                                         span_target_len(rows.shape[1]), t5, seed, salt)
        return spans
    return lambda rows, idx, salt: get_batch(rows, idx)
