"""Layers inside a transformer block: norms, rotary positions, attention, MLPs, KV cache.

Every layer here is shaped by a :class:`ModelConfig` and knows nothing about
pipelines or initialisation; :mod:`conveyor.models.blocks` sets the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from conveyor.config import ModelConfig
from conveyor.models.linear import Linear

__all__ = ["make_norm", "make_final_norm", "residual", "ACTIVATION_FNS", "Rotary", "LeftPadding", "KVCache", "Attention", "GeluMLP", "SwiGLU", "make_mlp"]


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm with bias (gpt2) or RMSNorm (llama) over the hidden width."""
    if cfg.flavour == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def make_final_norm(cfg: ModelConfig) -> nn.Module:
    """The norm a head (or T5's encoder) applies to the stream: none under post-norm."""
    return nn.Identity() if cfg.norm_position == "post" else make_norm(cfg)


def residual(x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor], post: bool) -> Tensor:
    """One residual step: x + sublayer(norm(x)) (pre-norm) or norm(x + sublayer(x)) (post-norm)."""
    return norm(x + sublayer(x)) if post else x + sublayer(norm(x))


ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
    "relu": F.relu,
}
"""``ModelConfig.act`` -> the function."""


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) applied to queries or keys."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        # float64 so long tables keep their precision before the cast to fp32
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, head_dim)
        # Non-persistent: derived from the config, so never part of a checkpoint
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, start_pos: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x`` (B, heads, T, head_dim) for positions start_pos.., or per row ``positions`` (B, T)."""
        if positions is not None:
            cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # (B, 1, T, head_dim)
            sin = self.sin[positions].unsqueeze(1).to(x.dtype)
            return x * cos + _rotate_half(x) * sin
        T = x.shape[-2]
        cos = self.cos[start_pos : start_pos + T].to(x.dtype)  # (T, head_dim)
        sin = self.sin[start_pos : start_pos + T].to(x.dtype)
        return x * cos + _rotate_half(x) * sin


@dataclass
class LeftPadding:
    """A batch of prompts of unequal lengths, each row left-padded to one length.

    Row ``b`` has ``pad[b]`` pad slots before its first token, so slot ``j`` of it
    is position ``j - pad[b]``; its keys are only its own slots from ``pad[b]`` on.
    Batched decoding then computes, row by row, what each prompt alone computes.
    """

    pad: Tensor
    """Pad slots before each row's first token, (B,) int64."""
    max_seq_len: int
    """Positions are clamped below this (rows past their own end compute garbage)."""
    _memo: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def positions(self, start: int, T: int) -> Tensor:
        """Positions (B, T) of slots start..start+T-1 (pad slots get 0)."""
        return self._get(start, T)[0]

    def mask(self, start: int, T: int) -> Tensor:
        """Which keys (slots 0..start+T-1) each of slots start.. attends to: (B, 1, T, L) bool."""
        return self._get(start, T)[1]

    def _get(self, start: int, T: int) -> tuple[Tensor, Tensor]:
        # every layer of a microbatch asks for the same slots: build them once
        if (start, T) not in self._memo:
            self._memo.clear()
            slots = torch.arange(start, start + T, device=self.pad.device)  # (T,)
            keys = torch.arange(start + T, device=self.pad.device)  # (L,)
            positions = (slots[None, :] - self.pad[:, None]).clamp(0, self.max_seq_len - 1)
            causal = keys[None, :] <= slots[:, None]  # (T, L)
            real = keys[None, :] >= self.pad[:, None]  # (B, L)
            # a pad slot sees itself: a query with no key at all would give NaN
            mask = (causal & real[:, None, :]) | (keys[None, :] == slots[:, None])
            self._memo[(start, T)] = (positions, mask[:, None])  # (B, T), (B, 1, T, L)
        return self._memo[(start, T)]


class KVCache:
    """Preallocated keys and values of one block, for incremental decoding."""

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.padding: LeftPadding | None = None  # set for left-padded batches of prompts

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache sized for one transformer block of ``cfg`` (max_len defaults to max_seq_len)."""
        length = cfg.max_seq_len if max_len is None else max_len
        return cls(batch_size, cfg.kv_heads, length, cfg.head_dim, dtype=dtype, device=device)

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, kv_heads, T, head_dim) at start_pos; return all keys/values so far."""
        B, _, T, _ = k.shape
        end = start_pos + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but start_pos={start_pos} + "
                f"{T} new tokens = {end}; allocate a longer cache"
            )
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, kv_heads, end, head_dim)


class Attention(nn.Module):
    """Causal multi-head self-attention with optional grouped-query heads and rotary."""

    tp_plan: ClassVar[dict[str, str]] = {"qkv": "column", "out": "row"}
    """How tensor parallelism splits the linears (``parallel.tp_blocks``): heads by rank."""
    recompute_core: bool = False
    """Selective recomputation: keep q, k, v (the linears' outputs) for backward and run
    the attention core (rotary, softmax attention) again there instead of keeping its
    own saved tensors. Set per module by the stage runner."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.flavour == "gpt2"
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # One fused projection: a single matmul for q, k and v
        self.qkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias)
        self.out = Linear(cfg.d_model, cfg.d_model, bias)
        self.rotary = (
            Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            if cfg.flavour == "llama"
            else None
        )

    def _repeat_kv(self, x: Tensor) -> Tensor:
        # Query head h reads kv head h // groups; explicit copy keeps torch<2.5 (no enable_gqa)
        groups = self.n_heads // self.kv_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=1)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Attend over x (B, T, D) and, if given, the cached earlier positions."""
        B, T, _ = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, hd)
        padding = None if kv_cache is None else kv_cache.padding
        if kv_cache is None:
            if self.recompute_core and torch.is_grad_enabled():
                y = checkpoint(self._core, q, k, v, start_pos, use_reentrant=False)
            else:
                y = self._core(q, k, v, start_pos)
        else:
            if self.rotary is not None:
                positions = None if padding is None else padding.positions(start_pos, T)
                q, k = self.rotary(q, start_pos, positions), self.rotary(k, start_pos, positions)
            k, v = kv_cache.update(k, v, start_pos)  # (B, kv_heads, L, head_dim), L = start+T
            mask = None
            if padding is not None:
                mask = padding.mask(start_pos, T)  # (B, 1, T, L)
            elif T > 1:
                # is_causal aligns to the top-left corner, wrong when L > T; mask explicitly
                L = k.shape[2]
                query_pos = torch.arange(start_pos, start_pos + T, device=x.device)
                mask = torch.arange(L, device=x.device)[None, :] <= query_pos[:, None]  # (T, L)
            y = F.scaled_dot_product_attention(
                q, self._repeat_kv(k), self._repeat_kv(v), attn_mask=mask
            )
        # this module's heads only: under tensor parallelism fewer than d_model / head_dim
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.out(y)

    def _core(self, q: Tensor, k: Tensor, v: Tensor, start_pos: int) -> Tensor:
        # Training path: rotary, then the fused causal kernel with no explicit mask
        if self.rotary is not None:
            q, k = self.rotary(q, start_pos), self.rotary(k, start_pos)
        return F.scaled_dot_product_attention(
            q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True
        )


class GeluMLP(nn.Module):
    """GPT-2 MLP: up-projection, activation (tanh-approximate GELU), down-projection, with biases."""

    tp_plan: ClassVar[dict[str, str]] = {"up": "column", "down": "row"}
    """How tensor parallelism splits the linears: the hidden width by rank."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(cfg.d_model, cfg.ffn_dim)
        self.down = Linear(cfg.ffn_dim, cfg.d_model)
        self.act = ACTIVATION_FNS[cfg.act]

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.down(self.act(self.up(x)))


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x), no biases (another activation: GeGLU and kin)."""

    tp_plan: ClassVar[dict[str, str]] = {"w1": "column", "w3": "column", "w2": "row"}
    """How tensor parallelism splits the linears: the hidden width by rank."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w3 = Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.w2 = Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down
        self.act = ACTIVATION_FNS[cfg.act]

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The MLP of the configured flavour."""
    return GeluMLP(cfg) if cfg.flavour == "gpt2" else SwiGLU(cfg)
