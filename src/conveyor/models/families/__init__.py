"""The model families by name: ``family_of(cfg)`` is the one lookup of a config's family."""

from __future__ import annotations

from conveyor.config import ModelConfig
from conveyor.models.families.bert import BERT
from conveyor.models.families.gpt import GPT
from conveyor.models.families.t5 import T5
from conveyor.models.family import Family

__all__ = ["FAMILY_MODULES", "family_of"]

FAMILY_MODULES: dict[str, Family] = {f.name: f for f in (GPT, BERT, T5)}
"""Every family, by the name ``ModelConfig.family`` uses."""


def family_of(cfg: ModelConfig) -> Family:
    """The family ``cfg`` builds."""
    return FAMILY_MODULES[cfg.family]
