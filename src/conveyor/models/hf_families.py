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
from conveyor.models.hf_t5 import T5_HF

__all__ = ["HF_FAMILIES", "NOT_CONVERTIBLE", "family_of_hf", "family_of"]

HF_FAMILIES: tuple[HFFamily, ...] = (GPT2, LLAMA, T5_HF)
"""Every convertible family."""

NOT_CONVERTIBLE: dict[str, str] = {
    "bert": "Hugging Face's BERT is post-norm (LayerNorm after each residual add, none at the "
            "end), with a biased MLM decoder; Conveyor's bert family is pre-norm with a final "
            "norm and an unbiased decoder, so no weights map exactly",
}
"""Why a family (Conveyor's ``family``, HF's ``model_type``) converts neither way."""


def _known() -> str:
    return ", ".join(f.architecture for f in HF_FAMILIES)


def family_of_hf(raw: Mapping[str, Any], where: str) -> HFFamily:
    """The family of an HF config.json (by ``architectures``, else ``model_type``)."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type in NOT_CONVERTIBLE:
        raise ConfigError(f"{where}: model_type={model_type!r} cannot be imported: "
                          f"{NOT_CONVERTIBLE[model_type]}")
    if isinstance(archs, list) and archs:
        for family in HF_FAMILIES:
            if family.architecture in archs:
                return family
        raise ConfigError(f"{where}: architectures={archs!r} cannot be imported; "
                          f"Conveyor imports {_known()}")
    for family in HF_FAMILIES:
        if family.model_type == model_type:
            return family
    raise ConfigError(f"{where}: model_type={model_type!r} cannot be imported; "
                      f"Conveyor imports {_known()}")


def family_of(cfg: ModelConfig) -> HFFamily:
    """The family that exports ``cfg``'s family and flavour."""
    if cfg.family in NOT_CONVERTIBLE:
        raise ConfigError(f"family={cfg.family!r} has no Hugging Face export: "
                          f"{NOT_CONVERTIBLE[cfg.family]}")
    for family in HF_FAMILIES:
        if (family.family, family.flavour) == (cfg.family, cfg.flavour):
            return family
    raise ConfigError(f"family={cfg.family!r} with flavour={cfg.flavour!r} has no Hugging Face "
                      f"export; Conveyor exports {_known()} (t5 with flavour='llama')")
