"""Single-process reference for any family: the flat block list run in order, one loss.

Pipeline runs of every family are checked against this model built with the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.build import build_blocks
from conveyor.models.objective import Targets, normalise, target_counts

__all__ = ["SequentialModel"]


class SequentialModel(nn.Module):
    """All blocks of ``cfg`` in one module; state_dict keys are ``blocks.{i}.<name>``."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(build_blocks(cfg, seed))

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Any:
        """The head's output (logits, or its named outputs) for one batch of inputs."""
        x: Any = inputs
        for block in self.blocks:
            x = block(x)
        return x

    def loss(self, inputs: Tensor | Mapping[str, Tensor], targets: Targets) -> Tensor:
        """Each term's summed loss over its count of targets in this batch, added up."""
        sums = self.blocks[-1].loss(self(inputs), targets)
        return normalise(sums, {k: max(c, 1) for k, c in target_counts(targets).items()})
