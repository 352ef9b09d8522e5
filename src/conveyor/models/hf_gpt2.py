"""GPT-2 (``GPT2LMHeadModel``) <-> Conveyor's ``gpt2`` flavour: config fields and tensor names.

Both compute the same function: pre-norm blocks with LayerNorm, the tanh-approximate
GELU (HF's ``gelu_new``), learned positions, fused q/k/v with biases, a head without
bias. Two storage differences: HF's Conv1D keeps every block matrix as (in, out),
the transpose of a Linear's weight, and HF ties the head to ``wte`` by default.
Dropout settings are dropped on import (Conveyor trains without dropout) and written
as 0 on export, so ``transformers`` trains the function Conveyor trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.config import ModelConfig
from conveyor.models.hf import SHAPE_FIELDS, HFFamily, TensorMap, hf_field, refuse

__all__ = ["GPT2"]

# What GPT2Config assumes for a field its config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02, "tie_word_embeddings": True, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
}
# HF activation names that all compute 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(raw: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a GPT2LMHeadModel config.json; ConfigError if it has no equivalent."""
    def get(key: str) -> Any:
        return hf_field(raw, key, _DEFAULTS[key])

    act = get("activation_function")
    if act not in _TANH_GELU:
        raise refuse(where, "activation_function", act,
                     "Conveyor's gpt2 uses the tanh-approximate GELU ('gelu_new') only")
    for key, want, why in (
        ("scale_attn_weights", True, "Conveyor scales attention scores by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "Conveyor does not scale by layer index"),
        ("add_cross_attention", False, "Conveyor's gpt2 is decoder-only, without cross-attention"),
    ):
        if bool(get(key)) != want:
            raise refuse(where, key, get(key), why)
    d_model, d_ff = get("n_embd"), get("n_inner")
    return ModelConfig(
        flavour="gpt2",
        vocab_size=get("vocab_size"),
        n_layers=get("n_layer"),
        d_model=d_model,
        n_heads=get("n_head"),
        d_ff=None if d_ff in (None, 4 * d_model) else d_ff,
        max_seq_len=get("n_positions"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        norm_eps=float(get("layer_norm_epsilon")),
        init_std=float(get("initializer_range")),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The GPT2Config fields of ``cfg`` (shape only)."""
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Conveyor parameter <- GPT2LMHeadModel tensor, for every parameter of ``cfg``."""
    maps = [
        TensorMap("blocks.0.tok.weight", ("transformer.wte.weight",)),
        TensorMap("blocks.0.pos.weight", ("transformer.wpe.weight",)),
    ]
    # (Conveyor name in a block, HF name in transformer.h.{i}, Conv1D?)
    per_layer = (
        ("norm1.weight", "ln_1.weight", False), ("norm1.bias", "ln_1.bias", False),
        ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
        ("attn.out.weight", "attn.c_proj.weight", True), ("attn.out.bias", "attn.c_proj.bias", False),
        ("norm2.weight", "ln_2.weight", False), ("norm2.bias", "ln_2.bias", False),
        ("mlp.up.weight", "mlp.c_fc.weight", True), ("mlp.up.bias", "mlp.c_fc.bias", False),
        ("mlp.down.weight", "mlp.c_proj.weight", True), ("mlp.down.bias", "mlp.c_proj.bias", False),
    )
    for i in range(cfg.n_layers):
        maps += [TensorMap(f"blocks.{i + 1}.{ours}", (f"transformer.h.{i}.{theirs}",), conv1d)
                 for ours, theirs, conv1d in per_layer]
    head = cfg.n_layers + 1
    maps += [TensorMap(f"blocks.{head}.norm.weight", ("transformer.ln_f.weight",)),
             TensorMap(f"blocks.{head}.norm.bias", ("transformer.ln_f.bias",))]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(f"blocks.{head}.proj.weight", ("lm_head.weight",)))
    return maps


GPT2 = HFFamily(
    flavour="gpt2",
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    # rope_theta and n_kv_heads are unused by gpt2 (n_kv_heads must stay None there)
    exported_fields=SHAPE_FIELDS | {"rope_theta", "n_kv_heads"},
    # the causal-mask buffers older transformers saved with every attention layer
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
    base_prefix="transformer.",
)
