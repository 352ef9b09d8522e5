"""The model as a flat list of blocks, each built and initialised on its own.

For a config with ``n_layers`` layers the list has ``n_layers + 2`` entries::

    index 0               EmbeddingBlock    tokens (B, T)  -> hidden (B, T, D)
    index 1 .. n_layers   TransformerBlock  hidden (B, T, D) -> hidden (B, T, D)
    index n_layers + 1    HeadBlock         hidden (B, T, D) -> logits (B, T, V)

Block ``i`` draws its initial weights from a generator seeded by ``(seed, i)``
alone, so any subset of blocks built on any process equals the same slice of
the full model. That is what lets a pipeline reproduce single-process training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.layers import (
    Attention,
    KVCache,
    LeftPadding,
    make_final_norm,
    make_mlp,
    make_norm,
    residual,
)
from conveyor.models.linear import Linear
from conveyor.models.objective import IGNORE_INDEX, cross_entropy_sum

__all__ = [
    "EmbeddingBlock",
    "TransformerBlock",
    "HeadBlock",
    "tie_weights",
    "lm_loss",
    "initialise",
    "block_param_counts",
    "block_forward_flops",
    "block_activation_bytes",
]


class EmbeddingBlock(nn.Module):
    """Token embedding, plus learned positions for gpt2 (llama uses rotary inside attention)."""

    role: ClassVar[str] = "embedding"
    """Where a block sits in its family's list: the runtime reads stage roles off it."""
    tied_param_name: ClassVar[str] = "tok.weight"
    """Name of the parameter shared with the head when embeddings are tied."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        # tok must stay the first parameter: a tied head regenerates it as the
        # first draw of this block's generator (see _token_embedding_weight)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.flavour == "gpt2" else None

    def forward(
        self, tokens: Tensor, start_pos: int = 0, padding: LeftPadding | None = None
    ) -> Tensor:
        """Token ids (B, T) at positions start_pos.. (slots, under ``padding``) -> (B, T, D)."""
        T = tokens.shape[1]
        if padding is None and start_pos + T > self.max_seq_len:
            raise ValueError(
                f"start_pos={start_pos} + sequence length {T} exceeds max_seq_len="
                f"{self.max_seq_len}; use shorter sequences or raise max_seq_len"
            )
        x = self.tok(tokens)  # (B, T, D)
        if self.pos is not None and padding is not None:
            x = x + self.pos(padding.positions(start_pos, T))  # (B, T, D)
        elif self.pos is not None:
            positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
            x = x + self.pos(positions)  # (T, D) broadcast over B
        return x


class TransformerBlock(nn.Module):
    """Residual block: x + attn(norm1(x)), then x + mlp(norm2(x)); post-norm: norm1(x + attn(x)) and so on."""

    role: ClassVar[str] = "layer"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.post = cfg.norm_position == "post"

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Hidden states (B, T, D) -> (B, T, D); with a cache, x holds positions start_pos.."""
        x = residual(x, self.norm1, lambda h: self.attn(h, kv_cache, start_pos), self.post)
        return residual(x, self.norm2, self.mlp, self.post)


class HeadBlock(nn.Module):
    """Final norm (none under post-norm), the linear LM head, and the loss of its logits."""

    role: ClassVar[str] = "head"
    tied_param_name: ClassVar[str] = "proj.weight"
    """Name of the parameter shared with the embedding when embeddings are tied."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_final_norm(cfg)
        self.proj = Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        # what turns this head's logits into the summed loss: replaced when the logits
        # are split over ranks (parallel.tp_blocks: vocabulary-parallel cross-entropy)
        self.criterion: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum

    def forward(self, x: Tensor) -> Tensor:
        """Hidden states (B, T, D) -> logits (B, T, V)."""
        return self.proj(self.norm(x))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Summed next-token cross-entropy of ``forward``'s logits against targets (B, T).

        Targets equal to -100 are left out; the pipeline divides by the global target count.
        """
        return self.criterion(logits, targets)


def tie_weights(embedding: nn.Module, head: nn.Module) -> None:
    """Make the head's tied weight the very same Parameter as the embedding's token table.

    Each block names its side of the tie in its class's ``tied_param_name``.
    """
    src = embedding.get_parameter(type(embedding).tied_param_name)  # type: ignore[attr-defined]
    path, _, attr = type(head).tied_param_name.rpartition(".")  # type: ignore[attr-defined]
    owner = head.get_submodule(path)
    if src.shape != getattr(owner, attr).shape:
        raise ValueError(
            f"cannot tie embedding {tuple(src.shape)} to head "
            f"{tuple(getattr(owner, attr).shape)}; both blocks must come from the same ModelConfig"
        )
    setattr(owner, attr, src)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the counted targets (not -100), in float32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


# Projections that write into the residual stream get GPT-2's 1/sqrt(2*n_layers)
# scaling, so the residual's variance does not grow with depth
_RESIDUAL_OUT = frozenset({"attn.out.weight", "cross.out.weight", "mlp.down.weight",
                           "mlp.w2.weight"})


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


def _token_embedding_weight(cfg: ModelConfig, seed: int) -> Tensor:
    # Same shape, dtype and generator state as EmbeddingBlock.tok.weight's init
    weight = torch.empty(cfg.vocab_size, cfg.d_model)
    return weight.normal_(0.0, cfg.init_std, generator=_generator(seed, 0))


@torch.no_grad()
def initialise(block: nn.Module, cfg: ModelConfig, index: int, seed: int) -> None:
    """Draw block ``index``'s weights from its own generator, seeded by ``(seed, index)`` alone.

    A tied head's weight is the embedding's token table: every family's embedding block
    registers that table first, so the head regenerates it as block 0's first draw.
    """
    gen = _generator(seed, index)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    tied_head = getattr(block, "role", None) == "head" and cfg.tie_embeddings
    # named_parameters follows registration order, so the draws are reproducible
    for name, param in block.named_parameters():
        if tied_head and name == type(block).tied_param_name:
            param.copy_(_token_embedding_weight(cfg, seed))
        elif name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:  # norm gains
            param.fill_(1.0)
        else:
            std = residual_std if name in _RESIDUAL_OUT else cfg.init_std
            param.normal_(0.0, std, generator=gen)


def _qkv_width(cfg: ModelConfig) -> int:
    return (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim


def block_param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters of each block in order; a tied weight counts on both embedding and head."""
    D, V, Fd = cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    qkv = _qkv_width(cfg)
    if cfg.flavour == "gpt2":
        norm = 2 * D
        attn = D * qkv + qkv + D * D + D
        mlp = D * Fd + Fd + Fd * D + D
        embedding = V * D + cfg.max_seq_len * D
    else:
        norm = D
        attn = D * qkv + D * D
        mlp = 3 * D * Fd
        embedding = V * D
    layer = 2 * norm + attn + mlp
    head = norm * (cfg.norm_position == "pre") + V * D + V * cfg.head_bias
    return [embedding] + [layer] * cfg.n_layers + [head]


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs of each block for one sequence of ``seq_len`` tokens.

    Convention: 2 FLOPs per multiply-add. A linear layer costs 2*in*out per token.
    Attention scores (QK^T) and the weighted sum (AV) cost 2*2*T*T*D for full
    attention; we count half of it, 2*T*T*D, because causal kernels skip the masked
    half. Norms, activations, softmax and the embedding lookup count as 0.
    """
    D, V, T = cfg.d_model, cfg.vocab_size, seq_len
    mlp_mats = 2 if cfg.flavour == "gpt2" else 3
    layer_weights = D * _qkv_width(cfg) + D * D + mlp_mats * D * cfg.ffn_dim
    layer = 2.0 * T * layer_weights + 2.0 * T * T * D
    return [0.0] + [layer] * cfg.n_layers + [2.0 * T * D * V]


def block_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> list[int]:
    """Estimated bytes each block stashes for backward, per microbatch, in fp32.

    An estimate, assuming no recompute and a fused SDPA kernel that keeps no T x T
    matrix. Per token:

    - embedding: the int64 token ids, 8 bytes;
    - transformer block, 4 bytes times: block input, norm1 output, q, k, v (k and
      v at full width after grouped-query expansion), attention output, residual
      after attention and norm2 output (8*D), plus the MLP's hidden tensors:
      2*ffn_dim for gpt2 (before and after GELU), 4*ffn_dim for llama (gate,
      silu(gate), up, their product);
    - head, 4 bytes times: norm input and output (2*D) plus the log-softmax over
      the vocabulary that the loss keeps (V).
    """
    tokens = batch * seq_len
    D = cfg.d_model
    mlp_hidden = (2 if cfg.flavour == "gpt2" else 4) * cfg.ffn_dim
    layer = 4 * tokens * (8 * D + mlp_hidden)
    head = 4 * tokens * (2 * D + cfg.vocab_size)
    return [8 * tokens] + [layer] * cfg.n_layers + [head]
