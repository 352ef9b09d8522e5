"""Encoder and decoder layers that read and write named tensors (encoder, encoder-decoder).

Both are residual blocks over the stream ``hidden``, pre-norm or post-norm
(``ModelConfig.norm_position``). The encoder layer attends
bidirectionally under the padding mask ``attention_mask``; the decoder layer attends
causally to itself under ``decoder_mask`` and then, through cross-attention, to
``encoder_out`` under ``attention_mask``. Every other tensor of the state passes through
untouched, so a cut between any two layers carries the same names.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.models.attention import MaskedAttention
from conveyor.models.layers import KVCache, make_mlp, make_norm, residual

__all__ = ["DecoderLayer", "EncoderLayer", "NamedBlock", "NamedEmbedding", "NamedHead", "State"]

State = dict[str, Tensor]
"""A microbatch's named tensors as they flow through named blocks."""


class NamedBlock(nn.Module):
    """A block that maps a dict of named tensors to the next (see ``models.family``)."""

    role: ClassVar[str] = "layer"
    named_io: ClassVar[bool] = True


class NamedEmbedding(NamedBlock):
    """A family's first block; its token table ``tok`` is registered first (a tied head redraws it)."""

    role: ClassVar[str] = "embedding"
    tied_param_name: ClassVar[str] = "tok.weight"


class NamedHead(NamedBlock):
    """A family's last block: its ``loss`` sums each term over its targets."""

    role: ClassVar[str] = "head"
    tied_param_name: ClassVar[str] = "proj.weight"


class EncoderLayer(NamedBlock):
    """hidden + attn(norm1(hidden)) under the padding mask, then + mlp(norm2(.)) (or post-norm)."""

    def __init__(self, cfg: ModelConfig, *, relative_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = MaskedAttention(cfg, causal=False, relative_bias=relative_bias)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.post = cfg.norm_position == "post"

    def forward(self, state: State) -> State:
        """Reads hidden (B, T, D) and attention_mask (B, T); writes hidden."""
        mask = state["attention_mask"]
        x = residual(state["hidden"], self.norm1, lambda h: self.attn(h, mask), self.post)
        return {**state, "hidden": residual(x, self.norm2, self.mlp, self.post)}


class DecoderLayer(NamedBlock):
    """Causal self-attention, cross-attention to encoder_out, MLP; each normed and residual."""

    def __init__(self, cfg: ModelConfig, *, relative_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = MaskedAttention(cfg, causal=True, relative_bias=relative_bias)
        self.norm_cross = make_norm(cfg)
        self.cross = MaskedAttention(cfg, causal=False, cross=True)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.post = cfg.norm_position == "post"

    def forward(self, state: State) -> State:
        """Reads hidden (B, T, D), decoder_mask (B, T), encoder_out (B, S, D), attention_mask (B, S)."""
        memory, own, other = state["encoder_out"], state["decoder_mask"], state["attention_mask"]
        x = residual(state["hidden"], self.norm1, lambda h: self.attn(h, own), self.post)
        x = residual(x, self.norm_cross, lambda h: self.cross(h, other, memory), self.post)
        return {**state, "hidden": residual(x, self.norm2, self.mlp, self.post)}

    def decode(self, x: Tensor, start: int, cache: KVCache, self_mask: Tensor,
               memory_kv: tuple[Tensor, Tensor], memory_mask: Tensor) -> Tensor:
        """Decoder positions start.. (x: B, T, D) with cached keys and values (generation).

        ``cache`` gets x's self-attention keys/values and holds those of every earlier
        position; ``memory_kv`` are the cross-attention's over the encoder output,
        computed once (``cross.project_keys``). ``self_mask`` (B, start + T) marks the
        decoder's real positions, ``memory_mask`` (B, S) the source's.
        """

        def attend_self(h: Tensor) -> Tensor:
            k, v = cache.update(*self.attn.project_keys(h), start)
            return self.attn.attend(h, k, v, self_mask, start)

        x = residual(x, self.norm1, attend_self, self.post)
        x = residual(x, self.norm_cross,
                     lambda h: self.cross.attend(h, *memory_kv, memory_mask, start), self.post)
        return residual(x, self.norm2, self.mlp, self.post)
