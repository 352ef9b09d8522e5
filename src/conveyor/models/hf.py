"""Hugging Face ``transformers`` checkpoints and Conveyor's: what every family's name map shares.

A family module (``hf_gpt2``, ``hf_llama``, ``hf_t5``, ``hf_bert``; registered in
``hf_families``) describes, for one ModelConfig, which Conveyor tensor is which HF tensor
(:class:`TensorMap`) and how the two configs translate. This module converts name ->
tensor dicts both ways with those maps. No files are read here and ``transformers`` is
never imported: the formats are plain safetensors and JSON.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from conveyor.config import ConfigError, ModelConfig

__all__ = [
    "HF_ACTIVATIONS", "TO_HF_ACTIVATION",
    "TensorMap",
    "HFFamily",
    "SHAPE_FIELDS",
    "hf_field",
    "refuse",
    "activation_from_hf",
    "check_exportable",
    "expected_hf_names",
    "to_conveyor",
    "to_hf",
]


HF_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
    "silu": "silu", "swish": "silu",
}
"""HF's ``hidden_act`` names -> ``ModelConfig.activation`` (gelu_new and gelu_pytorch_tanh
compute the same tanh GELU)."""
TO_HF_ACTIVATION: dict[str, str] = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                                    "relu": "relu", "silu": "silu"}
"""``ModelConfig.act`` -> the ``hidden_act`` name an export writes."""


SHAPE_FIELDS = frozenset({"vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len",
                          "tie_embeddings", "norm_eps", "init_std"})
"""ModelConfig fields every family's HF config carries (``HFFamily.exported_fields``)."""


@dataclass(frozen=True)
class TensorMap:
    """One Conveyor tensor and the HF tensor(s) holding the same numbers."""

    conveyor: str
    """Single-process name, e.g. ``blocks.1.attn.qkv.weight``."""
    hf: tuple[str, ...]
    """HF names; several are stacked along dim 0 in this order (Llama's q, k, v -> qkv)."""
    transpose: bool = False
    """HF stores the matrix as (in, out): GPT-2's Conv1D."""
    sizes: tuple[int, ...] = ()
    """Rows of each HF part when there are several (splitting needs them on export)."""
    scale: float = 1.0
    """Conveyor's tensor is HF's times this (T5's unscaled attention scores folded into q)."""


@dataclass(frozen=True)
class HFFamily:
    """A model family's translation to and from one ``transformers`` architecture."""

    flavour: str
    """ModelConfig.flavour of this family."""
    architecture: str
    """The ``architectures`` entry of HF's config.json, e.g. ``GPT2LMHeadModel``."""
    model_type: str
    """HF's ``model_type``, e.g. ``gpt2``."""
    config_from_hf: Callable[[Mapping[str, Any], str], ModelConfig]
    """(HF config.json dict, where it came from) -> ModelConfig; ConfigError if unsupported."""
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    """ModelConfig -> HF config fields (model shape only; the caller adds token ids, dtype)."""
    tensor_maps: Callable[[ModelConfig], list[TensorMap]]
    """Every Conveyor parameter of the model and its HF source (a tied head is left out)."""
    exported_fields: frozenset[str]
    """ModelConfig fields config_to_hf carries; any other one must keep its default."""
    family: str = "gpt"
    """ModelConfig.family of this family (gpt, bert, t5)."""
    ignored: tuple[str, ...] = ()
    """Regexes of HF tensors with no Conveyor counterpart (saved buffers) skipped on import."""
    head: str = "lm_head.weight"
    """HF name of the LM head, which a tied checkpoint may or may not store."""
    base_prefix: str = ""
    """Prefix of every other tensor, which files saved from HF's base model (GPT2Model) lack."""
    store_tied_head: bool = False
    """Export a tied head's copy too: a reader taking the config as untied (transformers 4.x
    reads T5's ``tie_word_embeddings=false`` so) would otherwise start it at random."""
    copies: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """HF tensor -> a second name HF may keep it under (BERT's decoder bias): export writes
    both; import reads the copy when stored (the one a model untied in transformers 5 uses)."""
    absent: tuple[str, ...] = ()
    """Regexes of Conveyor parameters the HF architecture lacks (BertForMaskedLM has no NSP
    head): import initialises them as a fresh model would, export leaves them out."""
    exports: bool = True
    """Whether ``conveyor export --format hf`` writes this architecture (else import only)."""
    labels: bool = False
    """A sequence classifier: it exports a model with ``num_labels`` > 0, and only such."""

    def canonical(self, name: str) -> str:
        """A stored HF name as the maps spell it (with the base model's prefix)."""
        if name == self.head or name.startswith(self.base_prefix):
            return name
        return self.base_prefix + name

    def is_absent(self, name: str) -> bool:
        """Whether the Conveyor parameter ``name`` has no HF counterpart (see ``absent``)."""
        return any(re.fullmatch(pattern, name) for pattern in self.absent)

    def is_ignored(self, name: str, cfg: ModelConfig) -> bool:
        """Whether the HF tensor ``name`` (canonical) has nothing to load into."""
        if cfg.tie_embeddings and name == self.head:
            return True  # the head is the embedding; its stored copy adds nothing
        return any(re.fullmatch(pattern, name) for pattern in self.ignored)


def hf_field(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    """``raw[key]``, or HF's own default when the config file leaves the key out."""
    value = raw.get(key, default)
    return default if value is None and default is not None else value


def refuse(where: str, field: str, value: Any, why: str) -> ConfigError:
    """The one-line error for an HF setting Conveyor has no equivalent of."""
    return ConfigError(f"{where}: {field}={value!r} is not supported: {why}")


def activation_from_hf(act: Any, where: str) -> str:
    """The ``ModelConfig.activation`` of HF's ``hidden_act`` name; ConfigError if it has none."""
    if act not in HF_ACTIVATIONS:
        raise refuse(where, "hidden_act", act,
                     f"Conveyor's activations are {', '.join(sorted(HF_ACTIVATIONS))}")
    return HF_ACTIVATIONS[act]


def check_exportable(cfg: ModelConfig, family: HFFamily) -> None:
    """ConfigError naming a ModelConfig option that has no field in the family's HF config."""
    default = ModelConfig(family=cfg.family, flavour=cfg.flavour)
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        # special_ids are the tokenizer's numbering, which goes along with it
        if name in family.exported_fields or name in ("family", "flavour", "special_ids"):
            continue
        if getattr(cfg, name) != getattr(default, name):
            raise ConfigError(
                f"{name}={getattr(cfg, name)!r} has no equivalent in Hugging Face's "
                f"{family.architecture}; export a model with the default {name}="
                f"{getattr(default, name)!r}, or keep the Conveyor format"
            )


def expected_hf_names(maps: Collection[TensorMap]) -> list[str]:
    """Every HF tensor name the maps read, in order."""
    return [name for m in maps for name in m.hf]


def to_conveyor(maps: Collection[TensorMap], hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors (canonical names; every expected one present) -> Conveyor tensors."""
    out: dict[str, Tensor] = {}
    read: set[str] = set()
    for m in maps:
        parts = [hf[name].t() if m.transpose else hf[name] for name in m.hf]
        whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        if m.scale != 1.0:
            whole = whole * m.scale
        elif read.intersection(m.hf):  # one HF tensor shared by several Conveyor ones (T5)
            whole = whole.clone()
        read.update(m.hf)
        # contiguous copies: safetensors refuses views and tensors that share memory
        out[m.conveyor] = whole.contiguous()
    return out


def to_hf(maps: Collection[TensorMap], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Conveyor tensors (every mapped one present) -> HF tensors, each its own memory."""
    out: dict[str, Tensor] = {}
    for m in maps:
        whole = tensors[m.conveyor]
        if m.scale != 1.0:
            whole = whole / m.scale
        parts = whole.split(list(m.sizes)) if len(m.hf) > 1 else (whole,)
        for name, part in zip(m.hf, parts, strict=True):
            part = (part.t() if m.transpose else part).contiguous().clone()
            if name in out and not torch.equal(out[name], part):
                raise ConfigError(
                    f"{m.conveyor} differs from the other Conveyor tensors that Hugging Face "
                    f"keeps as the one tensor {name}; export a model where they are equal"
                )
            out[name] = part
    return out
