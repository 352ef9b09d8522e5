"""Where an objective's special ids stand: after a tokenizer's ids, or where the model says."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

__all__ = ["SpecialIds"]


@dataclass(frozen=True)
class SpecialIds:
    """Named special ids at ``base + offset``, unless ``given`` names their own ids."""

    base: int
    """Ids below it are the tokenizer's ordinary tokens."""
    _: KW_ONLY
    given: tuple[tuple[str, int], ...] = ()
    """(name, id) pairs of an imported model's own ids (``ModelConfig.special_ids``)."""

    def _id(self, name: str, offset: int) -> int:
        return dict(self.given).get(name, self.base + offset)
