"""Packing token streams into fixed-length rows, the train/val split, and their cache.

The split is by document (``split_documents``): a document's tokens are all in
training or all in validation, so validation measures text the model never saw.

Documents are concatenated, each followed by the end-of-text token, and the stream
is cut into non-overlapping rows of ``seq_len + 1`` tokens (the remainder is
dropped). A row gives ``inputs = row[:-1]`` and ``targets = row[1:]``::

    doc A = a0 a1 a2, doc B = b0 b1, seq_len = 2  ->  stream a0 a1 a2 E b0 b1 E
    rows: [a0 a1 a2]  [E b0 b1]   (E dropped)
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conveyor.data.atomic import atomic_write
from conveyor.data.errors import DataError

__all__ = ["pack", "split_documents", "TokenDataset"]

_UINT16_LIMIT = 1 << 16
_FORMAT = "pack-v2"  # bump when packing or splitting changes, so old caches are not reused


def pack(token_docs: Iterable[list[int]], seq_len: int, eot_id: int) -> np.ndarray:
    """Rows of shape (n, seq_len + 1); uint16 when every id fits, else int32."""
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be positive; pass --seq-len >= 1")
    eot = np.array([eot_id], dtype=np.int64)
    pieces: list[np.ndarray] = []
    for doc in token_docs:
        pieces.append(np.asarray(doc, dtype=np.int64))
        pieces.append(eot)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    width = seq_len + 1
    n_rows = len(stream) // width
    rows = stream[: n_rows * width].reshape(n_rows, width)
    top = int(stream.max()) if len(stream) else 0
    if len(stream) and int(stream.min()) < 0:
        raise DataError(f"token id {int(stream.min())} is negative; pass ids from a tokenizer")
    return rows.astype(np.uint16 if top < _UINT16_LIMIT else np.int32)


def split_documents(lengths: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out (a bool per document), about ``val_fraction`` of the tokens.

    Documents are drawn in a seeded random order until the held-out tokens reach the
    fraction; at least one is held out (when val_fraction > 0) and at least one is kept.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); pass e.g. 0.05")
    n = len(lengths)
    held = np.zeros(n, dtype=bool)
    if val_fraction == 0:
        return held
    if n < 2:
        raise DataError(
            f"the corpus is {n} document; validation holds out whole documents, so it needs "
            "at least 2 (split the text into several files, or pass --val-fraction 0)"
        )
    target = val_fraction * float(sum(lengths))
    taken = 0
    for i in np.random.default_rng(seed).permutation(n)[: n - 1]:
        held[i] = True
        taken += lengths[i]
        if taken >= target:
            break
    return held


@dataclass
class TokenDataset:
    """Packed training and validation rows, cached as one ``.npz`` (zip of two ``.npy``)."""

    train: np.ndarray
    """Training rows, shape (n_train, seq_len + 1)."""
    val: np.ndarray
    """Validation rows, shape (n_val, seq_len + 1); may have zero rows."""

    @staticmethod
    def cache_key(tokenizer_json: str, corpus_fingerprint: str, seq_len: int,
                  val_fraction: float, seed: int) -> str:
        """Hex digest of everything the rows depend on."""
        tok = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        text = f"{_FORMAT}|{tok}|{corpus_fingerprint}|{seq_len}|{val_fraction!r}|{seed}"
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def cache_path(cache_dir: Path, key: str) -> Path:
        """File name of the cached dataset for ``key``."""
        return Path(cache_dir) / f"dataset-{key[:16]}.npz"

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same directory, then rename."""
        atomic_write(Path(path), lambda f: np.savez(f, train=self.train, val=self.val))

    @classmethod
    def load(cls, path: Path) -> TokenDataset:
        """Read a saved dataset; DataError if it is missing or corrupt (zip CRCs are checked)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"dataset cache '{path}' does not exist; run prepare_data to build it")
        try:
            with np.load(path, allow_pickle=False) as data:
                train, val = data["train"], data["val"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"dataset cache '{path}' is corrupt ({type(exc).__name__}); "
                            "delete it so it is rebuilt") from None
        if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
            raise DataError(f"dataset cache '{path}' has shapes {train.shape} and {val.shape}; "
                            "delete it so it is rebuilt")
        return cls(train=train, val=val)
