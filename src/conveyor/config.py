"""Configuration dataclasses, validated on construction.

Every user mistake that can be found before a process starts is found here and
raised as :class:`ConfigError` naming the field, its value and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .schedules import SCHEDULE_CHUNKS, SCHEDULES, ScheduleError, check_virtual_stages

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "to_dict"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a decoder-only transformer."""

    flavour: Literal["gpt2", "llama"] = "gpt2"
    """'gpt2': LayerNorm, GELU MLP, learned positions. 'llama': RMSNorm, SwiGLU, rotary."""
    vocab_size: int = 8192
    """Number of token ids."""
    n_layers: int = 8
    """Number of transformer blocks (the embedding and head are extra blocks)."""
    d_model: int = 256
    """Hidden width."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama only); None means n_heads."""
    d_ff: int | None = None
    """MLP hidden width; None means 4*d_model (gpt2) or a SwiGLU width near 8/3*d_model (llama)."""
    max_seq_len: int = 128
    """Longest sequence the model accepts (size of the learned position table)."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head (grads summed across stages when split)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base (llama only)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        if self.flavour not in ("gpt2", "llama"):
            raise ConfigError(f"flavour={self.flavour!r} is unknown; use 'gpt2' or 'llama'")
        _positive(self, "vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )
        if self.head_dim % 2 and self.flavour == "llama":
            raise ConfigError(
                f"head_dim={self.head_dim} (d_model/n_heads) must be even for rotary positions"
            )
        if self.n_kv_heads is not None:
            _positive(self, "n_kv_heads")
            if self.flavour != "llama":
                raise ConfigError("n_kv_heads (grouped-query attention) needs flavour='llama'")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                    "choose n_kv_heads that divides n_heads"
                )
        if self.d_ff is not None:
            _positive(self, "d_ff")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """MLP hidden width actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.flavour == "gpt2":
            return 4 * self.d_model
        return 64 * ((8 * self.d_model // 3 + 63) // 64)

    @property
    def num_blocks(self) -> int:
        """Length of the flat block list: embedding + n_layers + head."""
        return self.n_layers + 2


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model and batch are split over processes."""

    pp: int = 1
    """Pipeline stages (ranks in a pipeline)."""
    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel width."""
    schedule: str = "1f1b"
    """Pipeline schedule name."""
    microbatches: int = 4
    """Microbatches per step per data-parallel replica."""
    virtual_stages: int | None = None
    """Model chunks per pipeline rank; None: what the schedule needs (2 for interleaved and zb-v)."""
    recompute: bool = False
    """Recompute block activations in backward instead of stashing them."""
    partition: Literal["uniform", "params"] = "uniform"
    """How blocks are assigned to stages."""

    def __post_init__(self) -> None:
        _positive(self, "pp", "dp", "tp", "microbatches")
        if self.virtual_stages is not None:
            _positive(self, "virtual_stages")
        if self.schedule not in SCHEDULES or self.schedule == "forward-only":
            names = ", ".join(n for n in sorted(SCHEDULES) if n != "forward-only")
            why = "cannot train (it has no backward)" if self.schedule in SCHEDULES else "is unknown"
            raise ConfigError(f"schedule={self.schedule!r} {why}; choose one of {names}")
        try:
            check_virtual_stages(self.schedule, self.chunks)
        except ScheduleError as err:
            raise ConfigError(str(err)) from None
        if self.partition not in ("uniform", "params"):
            raise ConfigError(
                f"partition={self.partition!r} is unknown; use 'uniform' or 'params'"
            )

    @property
    def world_size(self) -> int:
        """Processes needed: pp * dp * tp."""
        return self.pp * self.dp * self.tp

    @property
    def chunks(self) -> int:
        """Model chunks per rank actually used (virtual_stages, or the schedule's own)."""
        if self.virtual_stages is not None:
            return self.virtual_stages
        return SCHEDULE_CHUNKS[self.schedule] or 2

    @property
    def num_stages(self) -> int:
        """Total stages: pp * chunks."""
        return self.pp * self.chunks

    def check_against(self, model: ModelConfig, global_batch: int) -> None:
        """Raise ConfigError if this layout cannot run ``model`` on ``global_batch``."""
        if self.num_stages > model.num_blocks:
            raise ConfigError(
                f"layers={model.n_layers} (+ embedding and head = {model.num_blocks} blocks) "
                f"cannot be split into pp={self.pp} stages with virtual_stages="
                f"{self.chunks}; use pp*virtual_stages <= {model.num_blocks} "
                "or more layers"
            )
        per_replica, rem = divmod(global_batch, self.dp)
        if rem:
            raise ConfigError(
                f"batch_size={global_batch} is not divisible by dp={self.dp}; "
                "use a batch size that is a multiple of dp"
            )
        if per_replica % self.microbatches:
            raise ConfigError(
                f"batch_size={global_batch} cannot be split into microbatches="
                f"{self.microbatches} (per data-parallel replica: {per_replica} sequences); "
                "use a batch size that is a multiple of dp*microbatches"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (for logs and checkpoints)."""
    return dataclasses.asdict(cfg)
