"""The model families Conveyor converts to and from Hugging Face ``transformers``.

A new family writes its name map in one module (see ``hf_gpt2``) and adds it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.config import ConfigError, ModelConfig
from conveyor.models.hf import HFFamily
from conveyor.models.hf_bert import BERT_CLASSIFIER, BERT_MLM, BERT_PRETRAINING
from conveyor.models.hf_gpt2 import GPT2
from conveyor.models.hf_llama import LLAMA
from conveyor.models.hf_t5 import T5_HF

__all__ = ["HF_FAMILIES", "family_of_hf", "family_of"]

HF_FAMILIES: tuple[HFFamily, ...] = (GPT2, LLAMA, T5_HF, BERT_MLM, BERT_PRETRAINING,
                                     BERT_CLASSIFIER)
"""Every convertible architecture."""


def _known() -> str:
    return ", ".join(f.architecture for f in HF_FAMILIES)


def _num_labels(cfg: ModelConfig) -> int:
    return int(getattr(cfg, "num_labels", 0) or 0)  # a classifier head (fine-tuning)


def family_of_hf(raw: Mapping[str, Any], where: str) -> HFFamily:
    """The family of an HF config.json (by ``architectures``, else ``model_type``)."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
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
    """The architecture that exports ``cfg``'s family and flavour (and classifier head)."""
    classifier = _num_labels(cfg) > 0
    for family in HF_FAMILIES:
        if family.exports and (family.family, family.flavour, family.labels) == (
                cfg.family, cfg.flavour, classifier):
            return family
    if classifier:
        raise ConfigError(f"num_labels={_num_labels(cfg)} (a classifier) of family={cfg.family!r} "
                          "has no Hugging Face export; Conveyor exports classifiers as "
                          "BertForSequenceClassification (family bert, flavour gpt2)")
    exported = ", ".join(f.architecture for f in HF_FAMILIES if f.exports)
    raise ConfigError(f"family={cfg.family!r} with flavour={cfg.flavour!r} has no Hugging Face "
                      f"export; Conveyor exports {exported} (t5 with flavour='llama', bert "
                      "with flavour='gpt2')")
