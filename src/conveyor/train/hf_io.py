"""Hugging Face model directories: import one as a Conveyor export, write one from any model.

    HF_DIR/
      config.json                         model_type, architectures and the family's fields
      model.safetensors                   HF tensor names; or, above the shard size,
      model-00001-of-0000N.safetensors    shards, listed by
      model.safetensors.index.json        {"metadata": {"total_size"}, "weight_map": {name: file}}
      tokenizer.json                      the ``tokenizers`` file, as Conveyor's own
      tokenizer_config.json               tokenizer class and special tokens (AutoTokenizer)

``import_hf`` writes exactly what ``conveyor export`` writes (see ``export``), so every
reader of an export (generate, load_exported) reads an imported model. ``read_init``
reads what ``conveyor train --init`` starts from: such a directory converted in memory,
or a Conveyor export or checkpoint. The name maps are the families'
(``models.hf_families``); ``transformers`` is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

from ..config import ConfigError, ModelConfig
from ..data.atomic import atomic_write
from ..data.objectives import t5_specials
from ..data.tokenizer import EOT, TOKENIZER_CONFIG, Tokenizer, load_tokenizer, special_token
from ..models.build import build_block
from ..models.hf import TensorMap, check_exportable, expected_hf_names, to_conveyor, to_hf
from ..models.hf_families import family_of, family_of_hf
from .checkpoint import CheckpointError, read_meta, resolve_checkpoint
from .export import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelFiles,
    check_shapes,
    model_config_from,
    param_shapes,
    read_exported_config,
    read_model,
    read_tokenizer_bytes,
    write_export,
)
from .hf_tokens import special_ids_of, with_family_tokens

__all__ = ["INDEX_FILE", "DEFAULT_MAX_SHARD_SIZE", "Imported", "import_hf", "export_hf",
           "write_hf", "parse_size", "is_hf_dir", "init_config", "read_init"]

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Imported:
    """What ``import_hf`` wrote."""

    cfg: ModelConfig
    architecture: str
    out_dir: Path
    tokenizer: bool
    """Whether a tokenizer.json came along."""


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1024``; ConfigError if not one."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    size = int(float(m[1]) * _UNITS[(m[2] or "").upper()]) if m else 0
    if size < 1:
        raise ConfigError(f"--max-shard-size {text!r} is not a positive size; "
                          "write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return size


# -- reading ---------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; pass a Hugging Face model "
                              f"directory (from save_pretrained) with its {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); save the model again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object; save the model again")
    return raw


def _read_hf_tensors(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors file(s), by stored name."""
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE, "index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{hf_dir / INDEX_FILE} has no weight_map; save the model again")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / MODEL_FILE).is_file():
        files = [MODEL_FILE]
    elif (hf_dir / "pytorch_model.bin").is_file() or (hf_dir / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{hf_dir} holds PyTorch pickles (pytorch_model.bin), which Conveyor does not load; "
            "re-save it as safetensors: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR)"
        )
    else:
        raise CheckpointError(f"{hf_dir} has no {MODEL_FILE} or {INDEX_FILE}; pass a Hugging "
                              "Face model directory saved with save_pretrained")
    tensors: dict[str, Tensor] = {}
    for file in files:
        path = hf_dir / file
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                tensors.update((name, f.get_tensor(name)) for name in f.keys())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing but {INDEX_FILE} lists it; "
                                  "copy every shard of the model") from None
        except (OSError, RuntimeError, safetensors.SafetensorError) as err:
            raise CheckpointError(f"{path} is corrupt ({err}); save the model again") from None
    return tensors


def _check_not_same(source: Path, out_dir: Path) -> None:
    # both formats name their config config.json: writing over the source would destroy it
    if out_dir.resolve() == Path(source).resolve():
        raise ConfigError(f"--out {out_dir} is the model being converted; write into "
                          "another directory")


def _listing(label: str, names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{label} {', '.join(names[:3])}{more}"


def import_hf(hf_dir: Path, out_dir: Path) -> Imported:
    """Convert a Hugging Face model directory into a Conveyor export in ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} does not exist; pass a Hugging Face model directory")
    _check_not_same(hf_dir, out_dir)
    raw = _read_json(hf_dir / CONFIG_FILE, "config.json")
    architecture, cfg, tensors = _convert(hf_dir, raw)
    tokenizer = hf_dir / TOKENIZER_FILE
    has_tokenizer = tokenizer.is_file()
    write_export(out_dir, cfg, tensors, tokenizer if has_tokenizer else None, _labels(raw))
    if has_tokenizer:
        _name_end_token(out_dir, raw.get("eos_token_id"))
    return Imported(cfg, architecture, out_dir, has_tokenizer)


def _labels(raw: dict[str, Any]) -> tuple[str, ...]:
    """A classifier's class names in id order (HF's id2label), () for any other model."""
    names = raw.get("id2label")
    if "BertForSequenceClassification" not in (raw.get("architectures") or []) or \
            not isinstance(names, dict):
        return ()
    try:
        return tuple(str(names[k]) for k in sorted(names, key=int))
    except (TypeError, ValueError):
        return ()  # ids that are no numbers: HF's generic LABEL_i names are written back


def _hf_config(hf_dir: Path, raw: dict[str, Any]) -> tuple[Any, ModelConfig]:
    """The family of a Hugging Face config.json and its ModelConfig (refusing what has none)."""
    where = str(hf_dir / CONFIG_FILE)
    family = family_of_hf(raw, where)
    cfg = family.config_from_hf(raw, where)
    return family, dataclasses.replace(cfg, special_ids=special_ids_of(cfg, hf_dir))


def _convert(hf_dir: Path, raw: dict[str, Any]) -> tuple[str, ModelConfig, dict[str, Tensor]]:
    """(architecture, config, parameters by Conveyor name) of a Hugging Face directory."""
    family, cfg = _hf_config(hf_dir, raw)
    stored = {family.canonical(n): t for n, t in _read_hf_tensors(hf_dir).items()}
    for name, copy in family.copies.items():
        if copy in stored:
            stored[name] = stored.pop(copy)
    maps = family.tensor_maps(cfg)
    expected = expected_hf_names(maps)
    missing = [n for n in expected if n not in stored]
    known = set(expected)
    extra = sorted(n for n in stored if n not in known and not family.is_ignored(n, cfg))
    if missing or extra:
        problems = [_listing(label, names) for label, names in
                    (("missing", missing), ("unexpected", extra)) if names]
        raise CheckpointError(
            f"{hf_dir} does not hold the tensors its config.json describes for "
            f"{family.architecture}: {'; '.join(problems)}; save the model again with "
            "save_pretrained"
        )
    table = _table_name(maps)
    head = stored.get(family.head)
    if cfg.tie_embeddings and head is not None and not head.equal(stored[table]):
        # tied, the model reads the table: a different stored head would be dropped silently
        raise CheckpointError(
            f"{hf_dir}: {family.head} differs from {table}, but config.json ties them (an "
            "untied checkpoint saved with a tied config); save the model again with "
            "save_pretrained from the transformers that reads it"
        )
    tensors = to_conveyor(maps, stored)
    shapes = param_shapes(cfg)
    tensors.update(_fresh([n for n in shapes if n not in tensors and family.is_absent(n)], cfg))
    check_shapes(tensors, shapes, f"{hf_dir} (converted)")
    return family.architecture, cfg, tensors


def _fresh(names: list[str], cfg: ModelConfig) -> dict[str, Tensor]:
    """Parameters the HF architecture lacks, as a fresh Conveyor model (seed 0) starts them."""
    blocks = sorted({int(n.split(".")[1]) for n in names})
    made = {f"blocks.{i}.{k}": t for i in blocks for k, t in build_block(cfg, i, 0).state_dict().items()}
    return {n: made[n] for n in names}


def _table_name(maps: list[TensorMap]) -> str:
    """HF name of the token table (what a tied head is)."""
    return next(m.hf[0] for m in maps if m.conveyor == "blocks.0.tok.weight")


# -- a model to start training from ------------------------------------------------------


def is_hf_dir(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (its config.json names a model type)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    raw = _read_json(config, "config.json")
    return "model_type" in raw or "architectures" in raw


def init_config(path: Path) -> ModelConfig:
    """The model config of what ``--init`` names: a Hugging Face directory, an export or a
    checkpoint (or run directory); CheckpointError/ConfigError naming it if none."""
    path = Path(path)
    if is_hf_dir(path):
        return _hf_config(path, _read_json(path / CONFIG_FILE, "config.json"))[1]
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():
        return read_exported_config(path)
    if not path.exists():
        raise CheckpointError(f"--init {path} does not exist; pass a Hugging Face model "
                              "directory, a Conveyor export or a checkpoint")
    ckpt = resolve_checkpoint(path)
    return model_config_from(read_meta(ckpt).get("model"), f"checkpoint {ckpt}/meta.json")


def read_init(path: Path) -> ModelFiles:
    """The weights, config and tokenizer ``conveyor train --init PATH`` starts from.

    A Hugging Face directory is converted in memory (as ``import_hf`` would); a Conveyor
    export or checkpoint is read as ``export.read_model`` reads it.
    """
    path = Path(path)
    if not is_hf_dir(path):
        return read_model(path)
    raw = _read_json(path / CONFIG_FILE, "config.json")
    _, cfg, tensors = _convert(path, raw)
    tokenizer = path / TOKENIZER_FILE
    return ModelFiles(cfg, tensors, tokenizer if tokenizer.is_file() else None, None, path,
                      _labels(raw))


def _name_end_token(out_dir: Path, eos_id: Any) -> None:
    """Add the config's eos token to the copied tokenizer_config.json when it names none."""
    path = out_dir / TOKENIZER_CONFIG
    settings = _read_json(path, "tokenizer settings") if path.is_file() else {}
    if settings.get("eos_token") or not isinstance(eos_id, int):
        return
    try:
        token = HFTokenizer.from_file(str(out_dir / TOKENIZER_FILE)).id_to_token(eos_id)
    except Exception:  # tokenizers raises a bare Exception; generate reports a bad file itself
        return
    if token is not None and token != EOT:  # EOT is the end token without being named
        data = json.dumps({**settings, "eos_token": token}, indent=2).encode()
        atomic_write(path, lambda f: f.write(data))


# -- writing ---------------------------------------------------------------------------


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Tensors in order, cut into groups of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _tokenizer_files(model: ModelFiles) -> tuple[bytes, dict[str, Any], dict[str, int]] | None:
    """(tokenizer.json bytes, tokenizer_config, HF config's special ids), None without one."""
    if model.tokenizer is None:
        return None
    path = Path(model.tokenizer)
    data = read_tokenizer_bytes(path)
    tok = load_tokenizer(path)  # its end-of-text token is the HF eos
    sidecar = path.parent / TOKENIZER_CONFIG
    if sidecar.is_file():  # an imported HF tokenizer: keep its class and special tokens
        settings = _read_json(sidecar, "tokenizer settings")
        # without a class AutoTokenizer would pick the model type's, which may rebuild the
        # pipeline; the generic class loads tokenizer.json as it is
        settings.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if special_token(settings, "sep") is None:  # BERT's end token is its [SEP], no eos
            settings.setdefault("eos_token", tok.eot)
    else:
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.eot,
                    "eos_token": tok.eot, "model_max_length": model.cfg.max_seq_len,
                    "clean_up_tokenization_spaces": False}
        data, named = with_family_tokens(data, model.cfg)
        settings.update(named)
        tok = Tokenizer(HFTokenizer.from_str(data.decode()), tok.eot)
    ids = {f"{name}_token_id": tok.hf.token_to_id(token) for name in ("bos", "eos", "pad")
           if (token := special_token(settings, name)) is not None}
    if "eos_token_id" in ids:  # a decoder starts from its end token unless it names a bos
        ids.setdefault("bos_token_id", tok.eot_id)
    return data, settings, {k: v for k, v in ids.items() if v is not None}


def write_hf(out_dir: Path, model: ModelFiles, *, max_shard_size: int) -> list[str]:
    """Write ``model`` as a Hugging Face directory ``from_pretrained`` loads; the files written."""
    out_dir = Path(out_dir)
    _check_not_same(model.source, out_dir)
    cfg = model.cfg
    family = family_of(cfg)
    check_exportable(cfg, family)
    fields = family.config_to_hf(cfg)  # refuses a setting the HF config cannot express
    if "decoder_start_token_id" in fields:  # the decoder starts from the objective's pad
        fields["decoder_start_token_id"] = t5_specials(cfg).pad
    if family.labels and len(model.labels) == len(fields["id2label"]):
        fields["id2label"] = dict(enumerate(model.labels))  # the fine-tuning task's names
        fields["label2id"] = {label: i for i, label in enumerate(model.labels)}
    tokenizer = _tokenizer_files(model)
    maps = family.tensor_maps(cfg)
    hf = to_hf(maps, model.tensors)
    if cfg.tie_embeddings and family.store_tied_head:
        hf[family.head] = hf[_table_name(maps)].clone()
    hf.update((copy, hf[name].clone()) for name, copy in family.copies.items() if name in hf)
    dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    config = {"architectures": [family.architecture], "model_type": family.model_type,
              **fields, "dtype": dtype, "bos_token_id": None, "eos_token_id": None,
              **(tokenizer[2] if tokenizer else {})}
    shards = _shards(hf, max_shard_size)
    files = [MODEL_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file, shard in zip(files, shards, strict=True):
        data = safetensors.torch.save(shard, metadata={"format": "pt"})
        atomic_write(out_dir / file, lambda f, data=data: f.write(data))
    written = list(files)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf.values())},
                 "weight_map": {n: f for f, s in zip(files, shards, strict=True) for n in s}}
        _write_json(out_dir / INDEX_FILE, index)
        written.append(INDEX_FILE)
    _write_json(out_dir / CONFIG_FILE, config)
    written.append(CONFIG_FILE)
    if tokenizer is not None:
        tok_bytes, settings = tokenizer[0], tokenizer[1]
        atomic_write(out_dir / TOKENIZER_FILE, lambda f: f.write(tok_bytes))
        _write_json(out_dir / TOKENIZER_CONFIG, settings)
        written += [TOKENIZER_FILE, TOKENIZER_CONFIG]
    for stale in out_dir.iterdir():  # weights of an earlier export would shadow or mix in
        if stale.name not in written and (
            stale.name in (MODEL_FILE, INDEX_FILE) or _SHARD.fullmatch(stale.name)
        ):
            stale.unlink()
    return written


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def export_hf(source: Path, out_dir: Path, *, tokenizer: Path | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Export a checkpoint, run directory or Conveyor export as a Hugging Face directory."""
    max_bytes = parse_size(max_shard_size)
    return write_hf(out_dir, read_model(source, tokenizer=tokenizer), max_shard_size=max_bytes)
