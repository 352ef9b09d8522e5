"""Single-process reference model: the flat block list run in order.

Pipeline runs are checked against this model built with the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.blocks import lm_loss
from conveyor.models.build import build_blocks
from conveyor.models.layers import KVCache

__all__ = ["Transformer"]


class Transformer(nn.Module):
    """All blocks of ``cfg`` in one module; state_dict keys are ``blocks.{i}.<name>``."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(build_blocks(cfg, seed))

    def forward(
        self, tokens: Tensor, kv_caches: list[KVCache] | None = None, start_pos: int = 0
    ) -> Tensor:
        """Token ids (B, T) -> logits (B, T, V); with caches (one per layer), decode from start_pos."""
        if kv_caches is not None and len(kv_caches) != self.cfg.n_layers:
            raise ValueError(
                f"got {len(kv_caches)} KV caches for n_layers={self.cfg.n_layers}; "
                "pass one per transformer block (see new_kv_caches)"
            )
        embedding, *layers, head = self.blocks
        x = embedding(tokens, start_pos)  # (B, T, D)
        for i, layer in enumerate(layers):
            x = layer(x, None if kv_caches is None else kv_caches[i], start_pos)
        return head(x)  # (B, T, V)

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of the logits for ``tokens`` against ``targets`` (both (B, T))."""
        return lm_loss(self(tokens), targets)

    def new_kv_caches(
        self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32
    ) -> list[KVCache]:
        """One empty KV cache per transformer block, on this model's device."""
        device = next(self.parameters()).device
        return [
            KVCache.from_config(self.cfg, batch_size, max_len, dtype=dtype, device=device)
            for _ in range(self.cfg.n_layers)
        ]
