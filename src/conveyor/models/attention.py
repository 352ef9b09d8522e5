"""Attention for encoder and encoder-decoder families: bidirectional, causal or cross, masked.

Unlike the decoder's fused-qkv ``layers.Attention`` (causal, no padding), this one takes
a key padding mask, attends either to its own input or to a memory (cross-attention: the
encoder output), and may add a learned relative position bias (T5). Masks are
``(B, T)`` integer tensors, 1 for a real token and 0 for padding, as they cross stage
boundaries.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from conveyor.config import ModelConfig
from conveyor.models.linear import Linear

__all__ = ["MaskedAttention", "RelativePositionBias", "attention_mask"]


class RelativePositionBias(nn.Module):
    """T5's bucketed relative positions: a learned bias per (bucket, head) added to the scores.

    Half of the buckets hold exact small distances, the other half log-spaced ones up to
    ``max_distance``; bidirectional attention splits them again by the key's side.
    """

    def __init__(self, n_heads: int, *, bidirectional: bool, num_buckets: int = 32,
                 max_distance: int = 128) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, n_heads)

    def _bucket(self, relative: Tensor) -> Tensor:
        buckets = self.num_buckets
        out = torch.zeros_like(relative)
        if self.bidirectional:
            buckets //= 2
            out = (relative > 0).long() * buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp(min=0)  # keys after the query are masked anyway
        exact = buckets // 2
        far = exact + (
            torch.log(distance.float().clamp(min=1) / exact)
            / math.log(self.max_distance / exact) * (buckets - exact)
        ).long()
        far = far.clamp(max=buckets - 1)
        return out + torch.where(distance < exact, distance, far)

    def forward(self, q_len: int, k_len: int, device: torch.device, q_start: int = 0) -> Tensor:
        """Bias (1, heads, q_len, k_len) for queries at q_start.. against keys 0.."""
        relative = (torch.arange(k_len, device=device)[None, :]
                    - torch.arange(q_start, q_start + q_len, device=device)[:, None])  # key - query
        return self.table(self._bucket(relative)).permute(2, 0, 1).unsqueeze(0)


def attention_mask(key_mask: Tensor, q_len: int, *, causal: bool, q_start: int = 0) -> Tensor:
    """Boolean (B, 1, q_len, k_len): True where a query (at q_start..) may attend to a key."""
    allowed = key_mask.bool()[:, None, None, :]  # (B, 1, 1, k)
    if causal:
        k_len = key_mask.shape[1]
        allowed = allowed & torch.ones(q_len, k_len, dtype=torch.bool,
                                       device=key_mask.device).tril(diagonal=q_start)
    return allowed


class MaskedAttention(nn.Module):
    """Multi-head attention over the input itself or a memory, with a padding mask."""

    recompute_core: bool = False
    """Selective recomputation: keep q, k, v (the linears' outputs) for backward and run
    the core (mask, relative bias, softmax attention) again there. Set by the stage runner."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False,
                 relative_bias: bool = False) -> None:
        super().__init__()
        bias = cfg.flavour == "gpt2"
        self.causal, self.cross = causal, cross
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = Linear(cfg.d_model, cfg.d_model, bias)
        self.kv = Linear(cfg.d_model, 2 * cfg.d_model, bias)
        self.out = Linear(cfg.d_model, cfg.d_model, bias)
        self.relative = (RelativePositionBias(cfg.n_heads, bidirectional=not causal)
                         if relative_bias else None)

    tp_plan: ClassVar[dict[str, str]] = {"q": "column", "kv": "column", "out": "row"}
    """How tensor parallelism splits the linears (``parallel.tp_blocks``): heads by rank."""

    def shard_heads(self, tp: int) -> dict[str, Tensor]:
        """Keep n_heads / tp heads (tensor parallelism); the kv rows in shard order.

        A plain split of the fused [k; v] rows would give rank 0 all of k: rank r's chunk
        must be its own heads' [k_r; v_r]. Returns that order for ``kv``.
        """
        self.n_heads //= tp
        width = self.n_heads * self.head_dim
        full = width * tp
        order = [torch.arange(start + r * width, start + (r + 1) * width)
                 for r in range(tp) for start in (0, full)]
        return {"kv": torch.cat(order)}

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: Tensor, key_mask: Tensor, memory: Tensor | None = None) -> Tensor:
        """x (B, Tq, D) attends to itself, or to ``memory`` (B, Tk, D); key_mask is (B, Tk)."""
        source = memory if self.cross else x
        assert source is not None, "cross-attention needs the encoder output"
        k, v = self.project_keys(source)  # this rank's heads only under tp
        q = self._heads(self.q(x))
        if self.recompute_core and torch.is_grad_enabled():
            y = checkpoint(self._core, q, k, v, key_mask, 0, use_reentrant=False)
        else:
            y = self._core(q, k, v, key_mask, 0)
        return self._merge(y)

    def project_keys(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, heads, Tk, head_dim) of ``source`` (B, Tk, D)."""
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, q_start: int) -> Tensor:
        """Queries of x (B, Tq, D), at positions q_start.., against given keys and values.

        Incremental decoding: k, v hold every key so far (a cache, or a memory's keys
        computed once), so each new position computes what the full forward computes.
        """
        return self._merge(self._core(self._heads(self.q(x)), k, v, key_mask, q_start))

    def _merge(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def _core(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, q_start: int) -> Tensor:
        T = q.shape[2]
        allowed = attention_mask(key_mask, T, causal=self.causal, q_start=q_start)  # (B,1,Tq,Tk)
        mask: Tensor = allowed
        if self.relative is not None:
            bias = self.relative(T, k.shape[2], q.device, q_start).to(q.dtype)  # (1, h, Tq, Tk)
            mask = bias.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Tq, hd)
