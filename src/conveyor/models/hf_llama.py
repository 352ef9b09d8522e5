"""Llama (``LlamaForCausalLM``) <-> Conveyor's ``llama`` flavour: config fields and tensor names.

Both compute the same function: RMSNorm, SwiGLU, grouped-query attention without
biases, and rotary positions in the rotate-half convention (dimension i turns with
i + head_dim/2, HF's ``rotate_half``), so q and k rows need no permutation. Conveyor
fuses q, k and v into one projection; HF keeps three, stacked here in that order.
The rotary base is ``rope_parameters.rope_theta`` in transformers 5 and ``rope_theta``
in 4.x: both are read, both written. Only the plain ("default") rotary is supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.config import ModelConfig
from conveyor.models.hf import (
    SHAPE_FIELDS,
    TO_HF_ACTIVATION,
    HFFamily,
    TensorMap,
    activation_from_hf,
    hf_field,
    refuse,
)

__all__ = ["LLAMA"]

# What LlamaConfig assumes for a field its config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
    "head_dim": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
}


def _rope_theta(raw: Mapping[str, Any], where: str) -> float:
    """The rotary base from 5.x ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise refuse(where, "rope_parameters", params, "expected an object with rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise refuse(where, "rope_type", kind,
                     "Conveyor's rotary is the plain one ('default'), without scaling")
    return float(params.get("rope_theta") or hf_field(raw, "rope_theta", _DEFAULTS["rope_theta"]))


def config_from_hf(raw: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a LlamaForCausalLM config.json; ConfigError if it has no equivalent."""
    def get(key: str) -> Any:
        return hf_field(raw, key, _DEFAULTS[key])

    act = activation_from_hf(get("hidden_act"), where)  # the gate's: silu SwiGLU, gelu_tanh GeGLU
    for key in ("attention_bias", "mlp_bias"):
        if get(key):
            raise refuse(where, key, get(key), "Conveyor's llama projections have no biases")
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim")
    if head_dim is not None and n_heads and head_dim * n_heads != d_model:
        raise refuse(where, "head_dim", head_dim,
                     f"Conveyor's heads are hidden_size/num_attention_heads = {d_model // n_heads} wide")
    kv_heads = get("num_key_value_heads")
    return ModelConfig(
        flavour="llama",
        vocab_size=get("vocab_size"),
        n_layers=get("num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=None if kv_heads in (None, n_heads) else kv_heads,
        d_ff=get("intermediate_size"),
        max_seq_len=get("max_position_embeddings"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        norm_eps=float(get("rms_norm_eps")),
        rope_theta=_rope_theta(raw, where),
        init_std=float(get("initializer_range")),
        # None (the flavour's silu) keeps an ordinary Llama's config equal to a fresh one's
        activation=None if act == "silu" else act,  # type: ignore[arg-type]
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The LlamaConfig fields of ``cfg`` (shape only)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": TO_HF_ACTIVATION[cfg.act],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # what transformers 4.x reads; 5.x reads rope_parameters
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
    }


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Conveyor parameter <- LlamaForCausalLM tensor(s), for every parameter of ``cfg``."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    maps = [TensorMap("blocks.0.tok.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i + 1}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        maps += [
            TensorMap(f"{ours}.norm1.weight", (f"{theirs}.input_layernorm.weight",)),
            TensorMap(f"{ours}.attn.qkv.weight",
                      (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                      sizes=(q_rows, kv_rows, kv_rows)),
            TensorMap(f"{ours}.attn.out.weight", (f"{attn}.o_proj.weight",)),
            TensorMap(f"{ours}.norm2.weight", (f"{theirs}.post_attention_layernorm.weight",)),
            TensorMap(f"{ours}.mlp.w1.weight", (f"{theirs}.mlp.gate_proj.weight",)),
            TensorMap(f"{ours}.mlp.w3.weight", (f"{theirs}.mlp.up_proj.weight",)),
            TensorMap(f"{ours}.mlp.w2.weight", (f"{theirs}.mlp.down_proj.weight",)),
        ]
    head = cfg.n_layers + 1
    maps.append(TensorMap(f"blocks.{head}.norm.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        maps.append(TensorMap(f"blocks.{head}.proj.weight", ("lm_head.weight",)))
    return maps


LLAMA = HFFamily(
    flavour="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    exported_fields=SHAPE_FIELDS | {"n_kv_heads", "rope_theta", "activation"},
    # the rotary table older transformers saved with every attention layer
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    base_prefix="model.",
)
