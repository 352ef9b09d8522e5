"""Sequence-classification heads: what a family's last block becomes when ``num_labels > 0``.

Both return summed cross-entropy over the examples (one target per example), so the
pipeline normalises by the global example count exactly as it does by token counts.

- ``PooledClassifier`` (encoder, named blocks): the first ([CLS]) token through the
  final ``norm``, ``pooled = tanh(pooler(x[:, 0]))``, ``logits = classifier(pooled)``;
  target ``label`` (B,). The attribute names match BERT's pretraining head (``norm``,
  ``pooler``), so fine-tuning keeps those weights, and Hugging Face's
  BertForSequenceClassification maps onto them.
- ``TokenClassifier`` (decoder, tensor blocks): a tensor block has one tensor in and one
  out, and a causal model's row is summed up by its last real token, whose position
  varies per row. So the head makes class logits at every position (B, T, L) and the
  targets say which position counts: (B, T), -100 everywhere except each row's last
  real token, which holds the label. The loss is the plain summed cross-entropy over
  counted targets, one per row; right padding after that token is never seen by it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.layers import make_final_norm
from conveyor.models.linear import Linear
from conveyor.models.objective import cross_entropy_sum
from conveyor.models.stack import NamedHead, State

__all__ = ["LABEL", "PooledClassifier", "TokenClassifier"]

LABEL = "label"
"""The target (and loss term) of the pooled classifier: one class id per example."""


class PooledClassifier(NamedHead):
    """Final norm, tanh pooler on the first token, linear classifier; term ``label``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_final_norm(cfg)
        self.pooler = Linear(cfg.d_model, cfg.d_model)
        self.classifier = Linear(cfg.d_model, cfg.num_labels)

    def forward(self, state: State) -> Tensor:
        """hidden (B, T, D) -> class logits (B, L)."""
        pooled = torch.tanh(self.pooler(self.norm(state["hidden"])[:, 0]))
        return self.classifier(pooled)

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed cross-entropy of the examples' labels."""
        return {LABEL: cross_entropy_sum(logits, targets[LABEL])}


class TokenClassifier(nn.Module):
    """Final norm and a linear classifier at every position; the targets pick one per row."""

    role: ClassVar[str] = "head"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_final_norm(cfg)
        self.classifier = Linear(cfg.d_model, cfg.num_labels)

    def forward(self, x: Tensor) -> Tensor:
        """hidden (B, T, D) -> class logits at every position (B, T, L)."""
        return self.classifier(self.norm(x))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy at the positions targets label (each row's last real token)."""
        return cross_entropy_sum(logits, targets)
