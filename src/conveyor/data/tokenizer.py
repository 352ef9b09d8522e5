"""Byte-level BPE tokenizer (HF ``tokenizers``), trained on a corpus and cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from conveyor.data.atomic import atomic_write
from conveyor.data.corpus import Corpus
from conveyor.data.errors import DataError

__all__ = ["EOT", "special_token", "DEFAULT_MAX_BYTES", "TOKENIZER_CONFIG", "Tokenizer", "train_tokenizer",
           "load_tokenizer", "end_of_text_token", "tokenizer_cache_path", "check_tokenizer_fits"]

log = logging.getLogger("conveyor.data")

EOT = "<|endoftext|>"
"""End-of-text special token, placed after every document when packing."""
TOKENIZER_CONFIG = "tokenizer_config.json"
"""A Hugging Face tokenizer's settings; beside a tokenizer.json, its ``eos_token`` replaces EOT."""
DEFAULT_MAX_BYTES = 20_000_000
"""Cap on training text: BPE training time grows with it (~12 MB of stdlib trains in seconds)."""
MIN_FREQUENCY = 2
_MIN_VOCAB = 257  # 256 byte tokens + EOT
_FORMAT = "bpe-bytelevel-v1"  # bump when training changes, so old caches are not reused
_ENCODE_CHUNK = 256  # documents per encode_batch call; bounds the Rust-side memory


class Tokenizer:
    """A trained byte-level BPE tokenizer (or an imported one) with an end-of-text token."""

    def __init__(self, hf: HFTokenizer, eot: str = EOT) -> None:
        eot_id = hf.token_to_id(eot)
        if eot_id is None:
            raise DataError(f"tokenizer has no {eot} token; retrain it with train_tokenizer")
        # a literal "<|endoftext|>" in user text is text: only packing puts real end tokens
        hf.encode_special_tokens = True
        self.hf = hf
        self.eot = eot
        self.eot_id: int = eot_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids (≤ the vocab size asked for when training)."""
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are encoded as plain text."""
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> Iterator[list[int]]:
        """Token ids of each text, encoded in parallel chunks."""
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            for enc in self.hf.encode_batch_fast(chunk, add_special_tokens=False):
                yield list(enc.ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the end-of-text token is kept as its literal string."""
        return str(self.hf.decode(list(ids), skip_special_tokens=False))

    def to_str(self) -> str:
        """The tokenizer.json text (used to key caches derived from this tokenizer)."""
        return str(self.hf.to_str())

    def save(self, path: Path) -> None:
        """Write tokenizer.json atomically (temporary name, then rename); an end token other
        than EOT (an imported model's) is named in a tokenizer_config.json beside it."""
        data = self.to_str().encode("utf-8")
        atomic_write(Path(path), lambda f: f.write(data))
        if self.eot != EOT:
            config = json.dumps({"eos_token": self.eot}).encode()
            atomic_write(Path(path).parent / TOKENIZER_CONFIG, lambda f: f.write(config))


def special_token(settings: dict, name: str) -> str | None:
    """The ``<name>_token`` a Hugging Face tokenizer_config names (``eos``, ``pad``...), or None."""
    token = settings.get(f"{name}_token")
    if isinstance(token, dict):  # an AddedToken written out by older transformers
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def end_of_text_token(path: Path) -> str:
    """EOT, or the ``eos_token`` of a Hugging Face tokenizer_config.json beside ``path`` (else
    its ``sep_token``: BERT names no eos, and ends every segment with [SEP])."""
    # Imported models keep their own end token (Llama's "</s>"), named where HF names it
    config = Path(path).parent / TOKENIZER_CONFIG
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
        return special_token(settings, "eos") or special_token(settings, "sep") or EOT
    except (OSError, ValueError, AttributeError):
        return EOT


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer.json; DataError if it is missing, corrupt or has no end-of-text token.

    The end-of-text token is EOT unless a tokenizer_config.json beside the file names
    another ``eos_token`` (see :func:`end_of_text_token`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' does not exist; pass a saved tokenizer.json "
                        "or train one with train_tokenizer")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"tokenizer file '{path}' is corrupt ({reason}); "
                        "delete it so it is retrained, or pass a valid tokenizer.json") from None
    eot = end_of_text_token(path)
    if hf.token_to_id(eot) is None and eot != EOT:
        raise DataError(f"tokenizer file '{path}' has no {eot} token, the eos_token of "
                        f"{path.parent / TOKENIZER_CONFIG}; set eos_token there to a token it has")
    if hf.token_to_id(eot) is None:
        raise DataError(f"tokenizer file '{path}' has no {eot} token; "
                        "delete it so it is retrained, or pass a tokenizer with that token")
    return Tokenizer(hf, eot)


def check_tokenizer_fits(tokenizer: Tokenizer, path: Path, vocab_size: int,
                         original: Path | None = None) -> None:
    """DataError unless ``tokenizer`` (read from ``path``) can drive a model of ``vocab_size``.

    Its ids must fit the model's; a tokenizer given in place of the ``original`` one
    must have the same vocabulary size, or its ids would mean other tokens (garbage text).
    """
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer '{path}' has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {vocab_size}; pass the tokenizer the model was trained with")
    if original is None or Path(original) == Path(path) or not Path(original).is_file():
        return
    try:
        size = load_tokenizer(Path(original)).vocab_size
    except DataError:
        return  # a broken original cannot be compared; the given one replaces it
    if size != tokenizer.vocab_size:
        raise DataError(f"tokenizer '{path}' has a vocabulary of {tokenizer.vocab_size} tokens, "
                        f"the model's own tokenizer '{original}' has {size}; pass the tokenizer "
                        "the model was trained with")


def tokenizer_cache_path(corpus: Corpus, vocab_size: int, cache_dir: Path,
                         max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Where ``train_tokenizer`` caches the tokenizer for this corpus and settings."""
    key = hashlib.sha256(
        f"{corpus.fingerprint}|{max_bytes}|{MIN_FREQUENCY}|{_FORMAT}".encode()
    ).hexdigest()
    return Path(cache_dir) / f"tokenizer-{key[:16]}-{vocab_size}.json"


def _training_sample(documents: Sequence[str], max_bytes: int) -> list[str]:
    """Evenly spread documents totalling at most ``max_bytes`` characters, in corpus order."""
    total = sum(len(d) for d in documents)
    if total <= max_bytes:
        return list(documents)
    stride = -(-total // max_bytes)  # ceil: take every stride-th document
    sample: list[str] = []
    budget = max_bytes
    for doc in documents[::stride]:
        if len(doc) > budget:
            break
        sample.append(doc)
        budget -= len(doc)
    return sample or [documents[0][:max_bytes]]


def train_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path, *,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> Tokenizer:
    """Train (or reuse the cached) byte-level BPE of ``vocab_size`` tokens on the corpus.

    Only about ``max_bytes`` of text (evenly spread documents) is used for training,
    which bounds the time; all of the corpus is still tokenized afterwards.
    """
    if vocab_size < _MIN_VOCAB:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer; "
                        f"use --vocab-size >= {_MIN_VOCAB} (256 bytes + {EOT})")
    if max_bytes < 1:
        raise DataError(f"max_bytes={max_bytes} must be positive; pass a byte cap >= 1")
    path = tokenizer_cache_path(corpus, vocab_size, cache_dir, max_bytes)
    if path.is_file():
        try:
            return load_tokenizer(path)
        except DataError as exc:
            log.warning("%s; retraining", exc)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = _training_sample(corpus.documents, max_bytes)
    hf.train_from_iterator(sample, trainer=trainer, length=len(sample))
    tokenizer = Tokenizer(hf)
    tokenizer.save(path)
    log.info("trained a %d-token tokenizer on %d documents -> %s",
             tokenizer.vocab_size, len(sample), path)
    return tokenizer
