"""From ``--data`` specs (or the stdlib) to a tokenizer and packed train/val rows, cached."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conveyor.data.corpus import read_documents, resolve_paths, stdlib_corpus_paths
from conveyor.data.errors import DataError
from conveyor.data.packing import TokenDataset, pack, split_documents
from conveyor.data.tokenizer import EOT, Tokenizer, train_tokenizer

__all__ = ["PreparedData", "prepare_data"]

log = logging.getLogger("conveyor.data")


@dataclass
class PreparedData:
    """What training needs from the data package."""

    tokenizer: Tokenizer
    """The trained (or cached) tokenizer."""
    train: np.ndarray
    """Training rows, shape (n_train, seq_len + 1)."""
    val: np.ndarray
    """Validation rows, shape (n_val, seq_len + 1)."""
    skipped: int
    """Number of files skipped as binary or not UTF-8."""
    fingerprint: str = ""
    """sha256 of the corpus text (``Corpus.fingerprint``): checkpoints record it."""


def prepare_data(specs: Sequence[str] | None, *, vocab_size: int, seq_len: int,
                 val_fraction: float, cache_dir: Path, seed: int,
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, tokenize, pack and split; None specs means the stdlib corpus.

    The tokenizer (trained on the corpus unless ``tokenizer`` is given, e.g. an imported
    model's) and the packed rows are cached in ``cache_dir``, keyed by the corpus text and
    every setting they depend on, so a second run only reads the files.
    """
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be positive; pass --seq-len >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); pass e.g. 0.05")
    paths = stdlib_corpus_paths() if specs is None else resolve_paths(specs)
    if not paths:
        raise DataError("found no stdlib source files for the default corpus; pass --data")
    corpus = read_documents(paths)
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus, vocab_size, Path(cache_dir))
    # rows are packed around the end token: another one (an imported model's) is another key
    text = tokenizer.to_str() + ("" if tokenizer.eot == EOT else tokenizer.eot)
    key = TokenDataset.cache_key(text, corpus.fingerprint, seq_len, val_fraction, seed)
    path = TokenDataset.cache_path(Path(cache_dir), key)
    dataset = None
    if path.is_file():
        try:
            dataset = TokenDataset.load(path)
        except DataError as exc:
            log.warning("%s; rebuilding", exc)
    if dataset is None:
        docs = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(corpus.documents)]
        held = split_documents([len(d) + 1 for d in docs], val_fraction, seed)
        train = pack((d for d, h in zip(docs, held, strict=True) if not h), seq_len,
                     tokenizer.eot_id)
        val = pack((d for d, h in zip(docs, held, strict=True) if h), seq_len, tokenizer.eot_id)
        if len(train) == 0:
            raise DataError(
                f"corpus too small: {len(corpus.documents)} documents make fewer than one "
                f"training sequence of {seq_len + 1} tokens; add data or lower --seq-len"
            )
        dataset = TokenDataset(train=train, val=val)
        dataset.save(path)
        log.info("packed %d train and %d val rows of %d tokens (%d of %d documents held "
                 "out) -> %s", len(train), len(val), seq_len + 1, int(held.sum()), len(docs), path)
    return PreparedData(tokenizer=tokenizer, train=dataset.train, val=dataset.val,
                        skipped=len(corpus.skipped), fingerprint=corpus.fingerprint)
