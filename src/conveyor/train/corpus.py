"""The corpus a run trains and validates on, read, tokenized and split in the parent,
checked to hold a batch (and a validation batch) before any rank starts."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig, ModelConfig
from ..data import DataError, PreparedData, Sampler, prepare_data
from ..data.objectives import check_objective, packed_seq_len, special_count
from ..data.tokenizer import Tokenizer

__all__ = ["prepare"]


def prepare(model: ModelConfig, data: DataConfig, *, seed: int, batch_size: int,
            run_dir: str, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, tokenize and split the corpus; DataError unless a batch (and a val batch) fit.

    ``tokenizer``: the one to use (a model's given by --init) instead of training one. The
    family's special ids (mask, sentinels) come after the tokenizer's, and its rows leave
    room for the tokens its examples add (``data.objectives``).
    """
    check_objective(model)
    cache = Path(data.cache_dir) if data.cache_dir else Path(run_dir) / ".cache"
    prepared = prepare_data(
        list(data.paths) if data.paths is not None else None,
        vocab_size=model.vocab_size - special_count(model), seq_len=packed_seq_len(model),
        val_fraction=data.val_fraction, cache_dir=cache, seed=seed, tokenizer=tokenizer,
    )
    Sampler(len(prepared.train), batch_size, seed, seq_len=model.max_seq_len)  # raises if too small
    if data.val_fraction > 0 and len(prepared.val) < batch_size:
        raise DataError(
            f"validation set too small: {len(prepared.val)} sequences < batch size {batch_size}; "
            "raise --val-fraction, add data or lower --batch-size (--val-fraction 0 skips "
            "evaluation)"
        )
    return prepared
