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
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.layers import Attention, KVCache, make_mlp, make_norm
from conveyor.models.linear import Linear
from conveyor.models.objective import IGNORE_INDEX, cross_entropy_sum

__all__ = [
    "EmbeddingBlock",
    "TransformerBlock",
    "HeadBlock",
    "tie_weights",
    "lm_loss",
    "build_block",
    "build_blocks",
    "block_param_counts",
    "block_forward_flops",
    "block_activation_bytes",
]


class EmbeddingBlock(nn.Module):
    """Token embedding, plus learned positions for gpt2 (llama uses rotary inside attention)."""

    tied_param_name: ClassVar[str] = "tok.weight"
    """Name of the parameter shared with the head when embeddings are tied."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        # tok must stay the first parameter: a tied head regenerates it as the
        # first draw of this block's generator (see _token_embedding_weight)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.flavour == "gpt2" else None

    def forward(self, tokens: Tensor, start_pos: int = 0) -> Tensor:
        """Token ids (B, T) at positions start_pos.. -> hidden states (B, T, D)."""
        T = tokens.shape[1]
        if start_pos + T > self.max_seq_len:
            raise ValueError(
                f"start_pos={start_pos} + sequence length {T} exceeds max_seq_len="
                f"{self.max_seq_len}; use shorter sequences or raise max_seq_len"
            )
        x = self.tok(tokens)  # (B, T, D)
        if self.pos is not None:
            positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
            x = x + self.pos(positions)  # (T, D) broadcast over B
        return x


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Hidden states (B, T, D) -> (B, T, D); with a cache, x holds positions start_pos.."""
        x = x + self.attn(self.norm1(x), kv_cache, start_pos)
        x = x + self.mlp(self.norm2(x))
        return x


class HeadBlock(nn.Module):
    """Final norm and the linear LM head (no bias), and the loss of its logits."""

    tied_param_name: ClassVar[str] = "proj.weight"
    """Name of the parameter shared with the embedding when embeddings are tied."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_norm(cfg)
        self.proj = Linear(cfg.d_model, cfg.vocab_size, bias=False)
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


def tie_weights(embedding: EmbeddingBlock, head: HeadBlock) -> None:
    """Make the head's weight the very same Parameter as the embedding's token table."""
    if embedding.tok.weight.shape != head.proj.weight.shape:
        raise ValueError(
            f"cannot tie embedding {tuple(embedding.tok.weight.shape)} to head "
            f"{tuple(head.proj.weight.shape)}; both blocks must come from the same ModelConfig"
        )
    head.proj.weight = embedding.tok.weight


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the counted targets (not -100), in float32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


# Projections that write into the residual stream get GPT-2's 1/sqrt(2*n_layers)
# scaling, so the residual's variance does not grow with depth
_RESIDUAL_OUT = frozenset({"attn.out.weight", "mlp.down.weight", "mlp.w2.weight"})


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


def _token_embedding_weight(cfg: ModelConfig, seed: int) -> Tensor:
    # Same shape, dtype and generator state as EmbeddingBlock.tok.weight's init
    weight = torch.empty(cfg.vocab_size, cfg.d_model)
    return weight.normal_(0.0, cfg.init_std, generator=_generator(seed, 0))


@torch.no_grad()
def _initialise(block: nn.Module, cfg: ModelConfig, index: int, seed: int) -> None:
    gen = _generator(seed, index)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    tied_head = isinstance(block, HeadBlock) and cfg.tie_embeddings
    # named_parameters follows registration order, so the draws are reproducible
    for name, param in block.named_parameters():
        if tied_head and name == HeadBlock.tied_param_name:
            param.copy_(_token_embedding_weight(cfg, seed))
        elif name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:  # norm gains
            param.fill_(1.0)
        else:
            std = residual_std if name in _RESIDUAL_OUT else cfg.init_std
            param.normal_(0.0, std, generator=gen)


def build_block(cfg: ModelConfig, index: int, seed: int) -> nn.Module:
    """Build block ``index`` of the flat list, initialised from ``(seed, index)`` only."""
    if not 0 <= index < cfg.num_blocks:
        raise ValueError(
            f"block index {index} is out of range; n_layers={cfg.n_layers} gives blocks "
            f"0..{cfg.num_blocks - 1} (embedding, layers, head)"
        )
    block: nn.Module
    if index == 0:
        block = EmbeddingBlock(cfg)
    elif index == cfg.num_blocks - 1:
        block = HeadBlock(cfg)
    else:
        block = TransformerBlock(cfg)
    _initialise(block, cfg, index, seed)
    return block


def build_blocks(
    cfg: ModelConfig,
    seed: int,
    indices: Iterable[int] | None = None,
    transform: Callable[[nn.Module], nn.Module] | None = None,
) -> list[nn.Module]:
    """Build the given blocks (all by default), tying embedding and head when both are here.

    ``transform`` rebuilds each block right after its full-size initialisation (e.g.
    into its tensor-parallel shard), before the tie.
    """
    order = list(range(cfg.num_blocks)) if indices is None else list(indices)
    blocks = [build_block(cfg, i, seed) for i in order]
    if transform is not None:
        blocks = [transform(b) for b in blocks]
    head = cfg.num_blocks - 1
    if cfg.tie_embeddings and 0 in order and head in order:
        embedding_block, head_block = blocks[order.index(0)], blocks[order.index(head)]
        assert isinstance(embedding_block, EmbeddingBlock)
        assert isinstance(head_block, HeadBlock)
        tie_weights(embedding_block, head_block)
    return blocks


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
    return [embedding] + [layer] * cfg.n_layers + [norm + V * D]


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
