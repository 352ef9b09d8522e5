"""Finding, checking and reading checkpoints (the loading half of ``checkpoint``).

Loads go by tensor name, not by rank, so a checkpoint saved with one layout loads
into any other; every shard's sha256 is checked against meta.json before a tensor
is read from it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import Tensor

from ..log import get_logger
from ..models import EmbeddingBlock, HeadBlock

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "META",
    "latest_checkpoint",
    "read_meta",
    "load_tensors",
    "check_checkpoint",
    "resolve_checkpoint",
    "newest_intact",
    "checkpoint_tokenizer",
]

log = get_logger(__name__)

FORMAT_VERSION = 1
META = "meta.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_BLOCK = re.compile(r"(?:optim\.)?blocks\.(\d+)\.")
_FIX_RESUME = (
    "delete that checkpoint directory to resume from an earlier one, or pass another --resume path"
)


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message names the path, the problem and the fix."""


# -- finding ---------------------------------------------------------------------------


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m and (path / META).is_file():
            found.append((int(m[1]), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints``, or None."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def checkpoint_tokenizer(ckpt_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The tokenizer.json a checkpoint names: a path relative to the checkpoint directory
    (so a moved or renamed run keeps working), or an absolute one (older checkpoints)."""
    named = meta.get("tokenizer_path")
    if not isinstance(named, str) or not named:
        return None
    path = Path(ckpt_dir) / named  # an absolute ``named`` stays itself
    digest = meta.get("tokenizer_sha256")
    if digest and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise CheckpointError(f"{path} is not the tokenizer checkpoint {ckpt_dir} was trained "
                              "with (its sha256 differs from meta.json's); restore it, or pass "
                              "the right one with --tokenizer")
    return path


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose meta.json and shards check out, or None.

    What ``--resume auto`` resumes: a newer checkpoint that fails its checks is
    skipped with a warning naming it and the one used instead.
    """
    skipped: list[tuple[Path, str]] = []
    found = None
    for _, path in reversed(_complete(Path(run_dir) / "checkpoints")):
        try:
            check_checkpoint(path, {})
        except CheckpointError as err:
            skipped.append((path, str(err)))
            continue
        found = path
        break
    for path, why in skipped:
        log.warning("--resume auto: skipping checkpoint %s (%s); %s", path, why,
                    f"resuming from {found} instead" if found else "no intact one is left")
    return found


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(
            f"{path} does not exist; pass a checkpoint directory (RUN/checkpoints/step-N) "
            "or a run directory that holds one"
        )
    if _STEP_DIR.fullmatch(path.name) or path.name.startswith(".tmp-step-"):
        read_meta(path)  # raises, explaining the incomplete checkpoint
    for root in (path / "checkpoints", path):
        found = _complete(root)
        if found:
            return found[-1][1]
    raise CheckpointError(
        f"{path} holds no complete checkpoint (no step-N/{META} under {path / 'checkpoints'}); "
        "pass a checkpoint directory, or the run directory of a run that saved one"
    )


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, checked for the fields loading relies on."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META
    if not path.is_file():
        if not ckpt_dir.is_dir():
            raise CheckpointError(
                f"checkpoint {ckpt_dir} does not exist; pass a checkpoint directory "
                "(RUN/checkpoints/step-N) or a run directory"
            )
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {META}, so its save never finished; {_FIX_RESUME}"
        )
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        version = meta.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has format_version {version}, newer than this "
                f"conveyor reads ({FORMAT_VERSION}); upgrade conveyor"
            )
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version is {version!r}")
        files, index = meta["files"], meta["index"]
        if not (isinstance(files, dict) and isinstance(index, dict)):
            raise ValueError("'files' and 'index' must be objects")
        stray = sorted({f for f in index.values() if f not in files})
        if stray:
            raise ValueError(f"index names files {stray} that 'files' lacks")
        step = meta.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step is {step!r}, not a non-negative integer")
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({err}); {_FIX_RESUME}") from None
    return meta


# -- loading ---------------------------------------------------------------------------


def load_tensors(
    ckpt_dir: Path, names: Iterable[str], *, verify: bool = True
) -> dict[str, Tensor]:
    """The named tensors (on CPU), from whichever shards hold them.

    With ``verify`` every shard read is first checked against its sha256 in meta.json,
    so a corrupt checkpoint raises before any tensor is returned.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    index: dict[str, str] = meta["index"]
    plan: dict[str, list[tuple[str, str]]] = {}  # file -> [(name asked, name stored)]
    missing = []
    for name in names:
        stored = _locate(name, index, meta)
        if stored is None:
            missing.append(name)
        else:
            plan.setdefault(index[stored], []).append((name, stored))
    if missing:
        raise CheckpointError(_missing_message(ckpt_dir, meta, missing))
    if verify:
        for file in plan:
            _verify(ckpt_dir / file, meta["files"][file])
    out: dict[str, Tensor] = {}
    for file, pairs in plan.items():
        path = ckpt_dir / file
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                for name, stored in pairs:
                    out[name] = f.get_tensor(stored)
        except (OSError, RuntimeError, safetensors.SafetensorError) as err:
            raise CheckpointError(f"checkpoint {path} is corrupt ({err}); {_FIX_RESUME}") from None
    return out


def check_checkpoint(ckpt_dir: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Before any rank starts: every shard's sha256, and the shapes of the model's tensors.

    Ranks that find a corrupt shard or a misshapen tensor fail at different times, and
    their peers then report the closed connection instead; checked here, the user
    sees the cause.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for file, digest in meta["files"].items():
        _verify(ckpt_dir / file, digest)
    plan: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for name, shape in shapes.items():
        stored = _locate(name, meta["index"], meta)
        if stored is not None:
            plan.setdefault(meta["index"][stored], []).append((name, stored, shape))
    wrong = []
    for file, items in sorted(plan.items()):
        try:
            with safetensors.safe_open(str(ckpt_dir / file), framework="pt") as f:
                wrong += [f"{name} {tuple(got)} (model config: {shape})"
                          for name, stored, shape in items
                          if tuple(got := f.get_slice(stored).get_shape()) != shape]
        except (OSError, RuntimeError, safetensors.SafetensorError) as err:
            raise CheckpointError(f"checkpoint {ckpt_dir / file} is corrupt ({err}); "
                                  f"{_FIX_RESUME}") from None
    if wrong:
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt_dir}: tensors do not match the model config of "
                              f"its {META}: {wrong[0]}{more}; was {META} edited? Restore it, or "
                              "resume another checkpoint")


def _tied_names(meta: dict[str, Any]) -> tuple[str, str] | None:
    model = meta.get("model")
    if not (isinstance(model, dict) and model.get("tie_embeddings")):
        return None
    if not isinstance(model.get("n_layers"), int):
        return None
    head = model["n_layers"] + 1
    return (f"blocks.0.{EmbeddingBlock.tied_param_name}",
            f"blocks.{head}.{HeadBlock.tied_param_name}")


def _locate(name: str, index: dict[str, str], meta: dict[str, Any]) -> str | None:
    """The stored name holding ``name``: itself, or its tied twin (optimizer state too)."""
    if name in index:
        return name
    tied = _tied_names(meta)
    if tied is not None:
        for src, dst in (tied, tied[::-1]):
            if name == src or name.startswith(f"optim.{src}."):
                twin = name.replace(src, dst, 1)
                if twin in index:
                    return twin
    return None


def _missing_message(ckpt_dir: Path, meta: dict[str, Any], missing: list[str]) -> str:
    index: dict[str, str] = meta["index"]
    by_file: dict[str, list[str]] = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    layout = "; ".join(
        f"{file}: {len(ns)} tensors{_block_range(ns)}" for file, ns in sorted(by_file.items())
    )
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    close = difflib.get_close_matches(missing[0], list(index), n=1)
    hint = f" (nearest stored name: {close[0]!r})" if close else ""
    return (
        f"checkpoint {ckpt_dir} holds no tensor {missing[0]!r}{hint}{more}; it was saved by "
        f"world_size={meta.get('world_size')} ranks as {layout or 'no tensors'}. "
        "Use the model config the checkpoint was saved with (meta.json 'model'), "
        "or start without --resume"
    )


def _block_range(names: list[str]) -> str:
    found = (_BLOCK.match(n) for n in names)
    blocks = sorted({int(m[1]) for m in found if m})
    return f" (blocks {blocks[0]}-{blocks[-1]})" if blocks else ""


def _verify(path: Path, expected: str) -> None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing; {_FIX_RESUME}") from None
    if h.hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (checksum mismatch); {_FIX_RESUME}"
        )
