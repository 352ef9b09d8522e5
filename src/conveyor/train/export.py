"""Export a checkpoint's model as one directory that needs no pipeline layout to load.

    out_dir/
      model.safetensors   every parameter under its single-process name, once
                          (with tied embeddings only blocks.0.tok.weight: the head shares it)
      config.json         the ModelConfig as a dict
      tokenizer.json      a copy of the run's tokenizer, when the checkpoint names one
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, to_dict
from ..data.atomic import atomic_write
from ..models import Transformer
from .checkpoint import CheckpointError, load_tensors, read_meta, resolve_checkpoint

__all__ = ["MODEL_FILE", "CONFIG_FILE", "TOKENIZER_FILE", "export_model", "load_exported"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def export_model(ckpt_dir: Path, out_dir: Path, *, tokenizer: Path | None = None) -> Path:
    """Write the model of ``ckpt_dir`` (or a run directory's latest checkpoint) to ``out_dir``.

    ``tokenizer`` overrides the tokenizer path the checkpoint's meta names. Returns ``out_dir``.
    """
    ckpt = resolve_checkpoint(Path(ckpt_dir))
    out_dir = Path(out_dir)
    meta = read_meta(ckpt)
    cfg = model_config_from(meta.get("model"), f"checkpoint {ckpt}/meta.json ('model')")
    shapes = _param_shapes(cfg)
    tensors = load_tensors(ckpt, shapes)
    _check_shapes(tensors, shapes, f"checkpoint {ckpt}")
    tok_path = tokenizer or meta.get("tokenizer_path")
    tok_bytes = None
    if tok_path:
        try:
            tok_bytes = Path(tok_path).read_bytes()
        except OSError as err:
            raise CheckpointError(
                f"cannot read tokenizer {tok_path} ({err.strerror}); pass --tokenizer PATH "
                "to copy another tokenizer.json into the export"
            ) from None
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(out_dir / MODEL_FILE, lambda f: f.write(data))
    config = json.dumps(to_dict(cfg), indent=2).encode()
    atomic_write(out_dir / CONFIG_FILE, lambda f: f.write(config))
    if tok_bytes is not None:
        atomic_write(out_dir / TOKENIZER_FILE, lambda f: f.write(tok_bytes))
    return out_dir


def load_exported(out_dir: Path) -> tuple[Transformer, ModelConfig]:
    """The single-process model of an export, with every parameter loaded from it."""
    out_dir = Path(out_dir)
    fix = f"create it with `conveyor export --checkpoint RUN_DIR --out {out_dir}`"
    cfg = read_exported_config(out_dir)
    path = out_dir / MODEL_FILE
    try:
        tensors = safetensors.torch.load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} has no {MODEL_FILE}; {fix}") from None
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); {fix}") from None
    model = Transformer(cfg, seed=0)
    params = dict(model.named_parameters())  # a tied head weight is listed once, as the embedding
    _check_shapes(tensors, {n: tuple(p.shape) for n, p in params.items()}, str(path))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return model, cfg


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
    try:
        return ModelConfig(**raw)
    except (TypeError, ConfigError) as err:
        raise CheckpointError(
            f"{where} is not a valid model config ({err}); was it written by another "
            "conveyor version? Edit it to match ModelConfig's fields"
        ) from None


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``cfg``'s model, without allocating or initialising it."""
    with torch.device("meta"):
        model = Transformer(cfg, seed=0)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _check_shapes(
    tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], where: str
) -> None:
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
