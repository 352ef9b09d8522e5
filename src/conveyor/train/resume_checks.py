"""What the parent checks before a run goes on from saved weights, so that a mismatch
ends in one line before any rank starts.

A resumed run must keep its checkpoint's model, data and batches (``check_resumable``)
and read the same corpus through the same tokenizer (``check_same_data``, against
what ``data_provenance`` recorded at save time). A run started from an ``--init``
model must train that very model, with its own tokenizer (``init_tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, to_dict
from ..data import DataError, PreparedData
from ..data.tokenizer import Tokenizer, load_tokenizer
from .checkpoint_files import checkpoint_tokenizer
from .export import ModelFiles
from .rundir import TOKENIZER_FILE

__all__ = ["check_resumable", "check_same_data", "data_provenance", "init_tokenizer"]

# what a resumed run must share with its checkpoint: the weights' shape and the data stream
_FIXED_ON_RESUME = {"train": ("batch_size", "seed")}


def check_resumable(run: RunConfig, ckpt: Path, meta: dict[str, Any]) -> None:
    """ConfigError unless ``run`` keeps the model, data and batches of ``ckpt`` and goes past it."""
    saved = {k: dict(meta.get(k) or {}) for k in ("model", "data", "train")}
    mine = json.loads(json.dumps(run.to_dict()))  # tuples as lists, as meta.json has them
    for section in ("model", "data"):
        diff = sorted(
            k for k in mine[section]
            if k != "cache_dir" and k in saved[section] and saved[section][k] != mine[section][k]
        )
        if diff:
            raise ConfigError(
                f"--resume {ckpt}: the checkpoint's {section} config differs in "
                f"{', '.join(diff)}; a resumed run keeps its model and data, so drop those options"
            )
    for section, keys in _FIXED_ON_RESUME.items():
        for key in keys:
            old = saved[section].get(key, mine[section][key])
            if old != mine[section][key]:
                raise ConfigError(
                    f"--resume {ckpt}: {key}={mine[section][key]} differs from the checkpoint's "
                    f"{key}={old}; a resumed run keeps its batches, so drop that option"
                )
    step = int(meta["step"])
    if step >= run.train.steps:
        raise ConfigError(
            f"--resume {ckpt}: the checkpoint is at step {step} and steps={run.train.steps}; "
            f"pass --steps above {step} to train further"
        )


def init_tokenizer(run: RunConfig, init: ModelFiles) -> Tokenizer:
    """The tokenizer of the --init model, after checking the run trains that very model."""
    where = f"--init {run.train.init}"
    mine, theirs = to_dict(run.model), to_dict(init.cfg)
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        shown = ", ".join(f"{k}={mine[k]!r} (the model's: {theirs[k]!r})" for k in diff[:3])
        raise ConfigError(f"{where}: model options {shown} disagree with the model it names, "
                          "which the run trains as it is; drop them")
    if init.tokenizer is None:
        raise ConfigError(f"{where} has no tokenizer.json, and training needs the model's own "
                          "tokenizer; add it to the directory (tokenizer.save_pretrained)")
    tokenizer = load_tokenizer(init.tokenizer)
    if tokenizer.vocab_size > init.cfg.vocab_size:
        raise DataError(f"{where}: its tokenizer has {tokenizer.vocab_size} ids but the model "
                        f"{init.cfg.vocab_size}; pass a model directory with its own tokenizer")
    return tokenizer


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_provenance(data: PreparedData) -> dict[str, str]:
    """What a checkpoint records of its data: the tokenizer (a path relative to the
    checkpoint, and its hash) and the corpus fingerprint, checked on resume."""
    return {"tokenizer_path": f"../../{TOKENIZER_FILE}",
            "tokenizer_sha256": _sha256(data.tokenizer.to_str()),
            "corpus_fingerprint": data.fingerprint}


def check_same_data(data: PreparedData, ckpt: Path, meta: dict[str, Any]) -> None:
    """DataError if the corpus or its tokenizer changed since ``ckpt`` was saved."""
    fix = "resume with the same --data files, or start a new run"
    saved = meta.get("corpus_fingerprint")
    if saved and data.fingerprint and saved != data.fingerprint:
        raise DataError(f"the --data files changed since checkpoint {ckpt} was saved (corpus "
                        f"fingerprint {data.fingerprint[:12]} != {saved[:12]}); {fix}")
    digest = meta.get("tokenizer_sha256")
    if digest is None:  # an older checkpoint: compare with the file it names, if still there
        path = checkpoint_tokenizer(ckpt, meta)
        digest = _sha256(load_tokenizer(path).to_str()) if path and path.is_file() else None
    if digest is not None and digest != _sha256(data.tokenizer.to_str()):
        raise DataError(f"the corpus now gives a different tokenizer than checkpoint {ckpt} "
                        f"was trained with; {fix}")
