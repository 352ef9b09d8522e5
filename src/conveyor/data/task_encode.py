"""Task records as a family's padded (inputs, targets) arrays: static shapes, specials placed.

Every example is padded to fixed lengths (the runtime needs one shape per step): the
model's ``max_seq_len``, and for an encoder-decoder's targets ``target_len``. Special
ids sit where pretraining put them:

- bert, classification: ``[CLS] text [SEP]`` then padding; inputs ``tokens``,
  ``segments`` (0), ``attention_mask``; target ``label`` (B,), the label's index;
- gpt, classification: ``text <eot>`` padded with eot; inputs ``tokens`` (B, T); targets
  (B, T): -100 except the eot ending the text, which holds the label (``TokenClassifier``);
- gpt, seq2seq: ``source <eot> target <eot>`` as one causal sequence; targets are the
  next tokens with -100 on the prompt's and the padding's;
- t5, seq2seq: encoder ``source <eos>``, decoder ``<pad> target`` (teacher forcing: the
  target shifted right, pad being the decoder's start), target ``lm`` = ``target <eos>``
  with -100 at padding — as span corruption lays it out.

An input longer than its room is a DataError naming both lengths, unless ``truncate``
(the user's ``--truncate``, or a task whose definition cuts its chunks), which keeps its
first tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from .errors import DataError
from .objectives import bert_specials, t5_specials
from .tasks import Record
from .tokenizer import Tokenizer

__all__ = ["TaskRows", "decoder_prompt", "encode_records", "encoder_source"]

IGNORE = -100


@dataclass(frozen=True)
class TaskRows:
    """Encoded examples: named input and target arrays sharing their first dim (a decoder's
    are single arrays), and ``last``, the position whose logits classify each row."""

    inputs: dict[str, np.ndarray] | np.ndarray
    targets: dict[str, np.ndarray] | np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.last)

    def batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        """The torch (inputs, targets) of the rows ``indices``."""
        return _take(self.inputs, indices), _take(self.targets, indices)


def _take(x: dict[str, np.ndarray] | np.ndarray, idx: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x[idx]))
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in x.items()}


def _fit(ids: list[int], room: int, truncate: bool, what: str, i: int, flag: str) -> list[int]:
    if len(ids) <= room:
        return ids
    if not truncate:
        raise DataError(f"record {i}: its {what} is {len(ids)} tokens, more than the {room} the "
                        f"context leaves; pass --truncate to keep the first {room}, or {flag}")
    return ids[:room]


def encode_records(records: Sequence[Record], model: ModelConfig, tokenizer: Tokenizer, *,
                   kind: str, labels: Sequence[str] = (), target_len: int = 32,
                   truncate: bool = False) -> TaskRows:
    """The family's padded arrays of ``records`` (``labels`` map label text to class ids)."""
    if not records:
        raise DataError("the task has no records in this split; add data or change "
                        "--val-fraction")
    texts = list(tokenizer.encode_batch([r.text for r in records]))
    T, eot = model.max_seq_len, tokenizer.eot_id
    longer = "use a checkpoint with a longer context (max_seq_len)"
    if kind == "classification":
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[r.output] for r in records], dtype=np.int64)
        if model.family == "bert":
            sp = bert_specials(model)
            tokens = np.full((len(records), T), sp.pad, dtype=np.int64)
            for i, ids in enumerate(texts):
                row = [sp.cls, *_fit(ids, T - 2, truncate, "text", i, longer), sp.sep]
                tokens[i, :len(row)] = row
            inputs = {"tokens": tokens, "segments": np.zeros_like(tokens),
                      "attention_mask": (tokens != sp.pad).astype(np.int64)}
            return TaskRows(inputs, {"label": y}, np.zeros(len(records), dtype=np.int64))
        tokens = np.full((len(records), T), eot, dtype=np.int64)
        targets = np.full((len(records), T), IGNORE, dtype=np.int64)
        last = np.zeros(len(records), dtype=np.int64)
        for i, ids in enumerate(texts):
            row = [*_fit(ids, T - 1, truncate, "text", i, longer), eot]
            tokens[i, :len(row)] = row
            last[i] = len(row) - 1
            targets[i, last[i]] = y[i]
        return TaskRows(tokens, targets, last)
    outs = list(tokenizer.encode_batch([r.output for r in records]))
    if model.family == "t5":
        sp5 = t5_specials(model)
        n = len(records)
        arrays = {"tokens": np.full((n, T), sp5.pad, dtype=np.int64),
                  "decoder_tokens": np.full((n, target_len), sp5.pad, dtype=np.int64)}
        lm = np.full((n, target_len), IGNORE, dtype=np.int64)
        for i, (src, tgt) in enumerate(zip(texts, outs, strict=True)):
            src = [*_fit(src, T - 1, truncate, "source", i, "a larger --seq-len"), sp5.eos]
            tgt = [*_fit(tgt, target_len - 1, truncate, "target", i, "a larger --target-len"),
                   sp5.eos]
            arrays["tokens"][i, :len(src)] = src
            lm[i, :len(tgt)] = tgt
            arrays["decoder_tokens"][i, :len(tgt)] = [sp5.pad, *tgt[:-1]]
        arrays["attention_mask"] = (arrays["tokens"] != sp5.pad).astype(np.int64)
        arrays["decoder_mask"] = (lm != IGNORE).astype(np.int64)
        return TaskRows(arrays, {"lm": lm}, np.zeros(n, dtype=np.int64))
    tokens = np.full((len(records), T), eot, dtype=np.int64)
    targets = np.full((len(records), T), IGNORE, dtype=np.int64)
    last = np.zeros(len(records), dtype=np.int64)
    for i, (src, tgt) in enumerate(zip(texts, outs, strict=True)):
        tgt = [*_fit(tgt, target_len - 1, truncate, "target", i, "a larger --target-len"), eot]
        prompt = decoder_prompt(src, T + 1 - len(tgt), truncate, i, eot)
        seq = prompt + tgt  # tokens see seq[:-1] and predict seq[1:]
        tokens[i, :len(seq) - 1] = seq[:-1]
        targets[i, len(prompt) - 1:len(seq) - 1] = tgt
        last[i] = len(prompt) - 1
    return TaskRows(tokens, targets, last)


def decoder_prompt(source: list[int], room: int, truncate: bool, i: int, eot: int) -> list[int]:
    """``source <eot>`` within ``room`` tokens: what a decoder reads before it completes."""
    return [*_fit(source, room - 1, truncate, "source", i, "a larger --seq-len"), eot]


def encoder_source(source: list[int], model: ModelConfig, truncate: bool, i: int) -> list[int]:
    """``source <eos>`` as an encoder-decoder reads it in fine-tuning (see encode_records)."""
    fitted = _fit(source, model.max_seq_len - 1, truncate, "source", i, "a larger --seq-len")
    return [*fitted, t5_specials(model).eos]
