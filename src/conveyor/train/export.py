"""Export a checkpoint's model as one directory that needs no pipeline layout to load.

    out_dir/
      model.safetensors   every parameter under its single-process name, once
                          (with tied embeddings only blocks.0.tok.weight: the head shares it)
      config.json         the ModelConfig as a dict
      tokenizer.json      a copy of the run's tokenizer, when the checkpoint names one
      tokenizer_config.json  only beside an imported Hugging Face tokenizer: its eos_token
      labels.json         only for a classifier (num_labels > 0): its class names in id order

``conveyor import`` writes the same directory from a Hugging Face one (``hf_io``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, to_dict
from ..data.atomic import atomic_write
from ..data.tokenizer import TOKENIZER_CONFIG
from ..models import Transformer
from .checkpoint import CheckpointError, load_tensors, read_meta, resolve_checkpoint
from .checkpoint_files import META, checkpoint_tokenizer

__all__ = ["MODEL_FILE", "CONFIG_FILE", "TOKENIZER_FILE", "LABELS_FILE", "ModelFiles", "export_model",
           "is_exported", "load_exported", "read_model", "write_export", "param_shapes",
           "check_shapes"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model read from disk: its config, its parameters by single-process name, its tokenizer."""

    cfg: ModelConfig
    tensors: dict[str, Tensor]
    """Every parameter once (a tied head is the embedding's blocks.0.tok.weight)."""
    tokenizer: Path | None
    """The tokenizer.json that goes with it, if any."""
    step: int | None
    """The checkpoint's step; None for an exported directory."""
    source: Path
    """The checkpoint or exported directory it was read from."""
    labels: tuple[str, ...] = ()
    """A fine-tuned classifier's class names in id order (its checkpoint's task meta)."""


def is_exported(path: Path) -> bool:
    """Whether ``path`` is an exported (or imported) model directory rather than a checkpoint."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file() \
        and not (path / META).is_file()


def read_model(path: Path, *, tokenizer: Path | None = None) -> ModelFiles:
    """The model of a checkpoint, a run directory (its latest) or an exported directory.

    ``tokenizer`` overrides the tokenizer the source names.
    """
    path = Path(path)
    if is_exported(path):
        cfg = read_exported_config(path)
        tensors = _read_exported_tensors(path)
        check_shapes(tensors, param_shapes(cfg), str(path / MODEL_FILE))
        own = path / TOKENIZER_FILE
        return ModelFiles(cfg, tensors, tokenizer or (own if own.is_file() else None), None, path,
                          _read_labels(path))
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = model_config_from(meta.get("model"), f"checkpoint {ckpt}/meta.json ('model')")
    shapes = param_shapes(cfg)
    tensors = load_tensors(ckpt, shapes)
    check_shapes(tensors, shapes, f"checkpoint {ckpt}")
    task = meta.get("task")
    labels = task.get("labels") if isinstance(task, dict) else None
    return ModelFiles(cfg, tensors, tokenizer or checkpoint_tokenizer(ckpt, meta),
                      int(meta["step"]) if "step" in meta else None, ckpt,
                      tuple(str(label) for label in labels) if isinstance(labels, list) else ())


def read_tokenizer_bytes(path: Path) -> bytes:
    """The bytes of a tokenizer file; CheckpointError naming it and the fix if unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(
            f"cannot read tokenizer {path} ({err.strerror}); pass --tokenizer PATH "
            "to copy another tokenizer.json into the export"
        ) from None


def _read_labels(out_dir: Path) -> tuple[str, ...]:
    """A classifier export's class names (labels.json), or () when it has none."""
    try:
        labels = json.loads((out_dir / LABELS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{out_dir / LABELS_FILE} is corrupt ({err}); export the "
                              "model again") from None
    return tuple(str(label) for label in labels) if isinstance(labels, list) else ()


def write_export(
    out_dir: Path, cfg: ModelConfig, tensors: dict[str, Tensor], tokenizer: Path | None,
    labels: tuple[str, ...] = (),
) -> Path:
    """Write config.json, model.safetensors and (given one) tokenizer.json into ``out_dir``,
    and a classifier's ``labels`` into labels.json."""
    out_dir = Path(out_dir)
    tok_bytes = read_tokenizer_bytes(tokenizer) if tokenizer else None
    sidecar = Path(tokenizer).parent / TOKENIZER_CONFIG if tokenizer else None
    side_bytes = sidecar.read_bytes() if sidecar is not None and sidecar.is_file() else None
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(out_dir / MODEL_FILE, lambda f: f.write(data))
    config = json.dumps(to_dict(cfg), indent=2).encode()
    atomic_write(out_dir / CONFIG_FILE, lambda f: f.write(config))
    if tok_bytes is not None:
        atomic_write(out_dir / TOKENIZER_FILE, lambda f: f.write(tok_bytes))
    if side_bytes is not None:
        atomic_write(out_dir / TOKENIZER_CONFIG, lambda f: f.write(side_bytes))
    else:
        # a stale one from an earlier export would name another end-of-text token
        (out_dir / TOKENIZER_CONFIG).unlink(missing_ok=True)
    if labels:
        names = json.dumps(list(labels)).encode()
        atomic_write(out_dir / LABELS_FILE, lambda f: f.write(names))
    else:
        (out_dir / LABELS_FILE).unlink(missing_ok=True)
    return out_dir


def export_model(ckpt_dir: Path, out_dir: Path, *, tokenizer: Path | None = None) -> Path:
    """Write the model of ``ckpt_dir`` (or a run directory's latest checkpoint) to ``out_dir``.

    ``tokenizer`` overrides the tokenizer path the checkpoint's meta names. Returns ``out_dir``.
    """
    model = read_model(ckpt_dir, tokenizer=tokenizer)
    return write_export(out_dir, model.cfg, model.tensors, model.tokenizer, model.labels)


def load_exported(out_dir: Path) -> tuple[Transformer, ModelConfig]:
    """The single-process model of an export, with every parameter loaded from it."""
    out_dir = Path(out_dir)
    cfg = read_exported_config(out_dir)
    path = out_dir / MODEL_FILE
    tensors = _read_exported_tensors(out_dir)
    model = Transformer(cfg, seed=0)
    params = dict(model.named_parameters())  # a tied head weight is listed once, as the embedding
    check_shapes(tensors, {n: tuple(p.shape) for n, p in params.items()}, str(path))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return model, cfg


def _read_exported_tensors(out_dir: Path) -> dict[str, Tensor]:
    fix = f"create it with `conveyor export --checkpoint RUN_DIR --out {out_dir}`"
    path = out_dir / MODEL_FILE
    try:
        return safetensors.torch.load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} has no {MODEL_FILE}; {fix}") from None
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); {fix}") from None


def read_exported_config(out_dir: Path) -> ModelConfig:
    """The ModelConfig of an exported model directory (its config.json)."""
    out_dir = Path(out_dir)
    fix = f"create it with `conveyor export --checkpoint RUN_DIR --out {out_dir}`"
    try:
        raw = json.loads((out_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} is not an exported model (no {CONFIG_FILE}); {fix}") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{out_dir / CONFIG_FILE} is corrupt ({err}); {fix}") from None
    return model_config_from(raw, str(out_dir / CONFIG_FILE))


def model_config_from(raw: Any, where: str) -> ModelConfig:
    """A ModelConfig from a saved dict; CheckpointError naming ``where`` if it is not one."""
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{where} holds no model config; export needs a checkpoint saved by `conveyor train`"
        )
    if "model_type" in raw or "architectures" in raw:
        raise CheckpointError(
            f"{where} is a Hugging Face config; convert the directory first with "
            "`conveyor import HF_DIR --out DIR` and use DIR"
        )
    try:
        return ModelConfig(**raw)
    except (TypeError, ConfigError) as err:
        raise CheckpointError(
            f"{where} is not a valid model config ({err}); was it written by another "
            "conveyor version? Edit it to match ModelConfig's fields"
        ) from None


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``cfg``'s model, without allocating or initialising it."""
    with torch.device("meta"):
        model = Transformer(cfg, seed=0)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_shapes(
    tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], where: str
) -> None:
    """CheckpointError listing missing, unexpected and misshapen tensors, if any."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    wrong = [
        f"{n} {tuple(tensors[n].shape)} (model: {shapes[n]})"
        for n in sorted(set(shapes) & set(tensors))
        if tuple(tensors[n].shape) != shapes[n]
    ]
    problems = [
        f"{label} {', '.join(items[:3])}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape:", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{where} does not match its model config: {'; '.join(problems)}; "
            "export again from a complete checkpoint of the same model"
        )
