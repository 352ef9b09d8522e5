"""The model families Conveyor converts to and from Hugging Face ``transformers``.

A new family writes its name map in one module (see ``hf_gpt2``) and adds it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.config import ConfigError, ModelConfig
from conveyor.models.hf import HFFamily
from conveyor.models.hf_gpt2 import GPT2
from conveyor.models.hf_llama import LLAMA

__all__ = ["HF_FAMILIES", "family_of_hf", "family_of"]

HF_FAMILIES: tuple[HFFamily, ...] = (GPT2, LLAMA)
"""Every convertible family; BERT and T5 join with the model-family work."""


def _known() -> str:
    return ", ".join(f.architecture for f in HF_FAMILIES)


def family_of_hf(raw: Mapping[str, Any], where: str) -> HFFamily:
    """The family of an HF config.json (by ``architectures``, else ``model_type``)."""
    archs = raw.get("architectures") or []
    if isinstance(archs, list) and archs:
        for family in HF_FAMILIES:
            if family.architecture in archs:
                return family
        raise ConfigError(f"{where}: architectures={archs!r} cannot be imported; "
                          f"Conveyor imports {_known()}")
    model_type = raw.get("model_type")
    for family in HF_FAMILIES:
        if family.model_type == model_type:
            return family
    raise ConfigError(f"{where}: model_type={model_type!r} cannot be imported; "
                      f"Conveyor imports {_known()}")


def family_of(cfg: ModelConfig) -> HFFamily:
    """The family that exports ``cfg``'s flavour."""
    for family in HF_FAMILIES:
        if family.flavour == cfg.flavour:
            return family
    raise ConfigError(f"flavour={cfg.flavour!r} has no Hugging Face export; "
                      f"Conveyor exports {_known()}")
