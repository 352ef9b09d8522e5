"""T5 (``T5ForConditionalGeneration``) <-> Conveyor's ``t5`` family, ``llama`` flavour.

Both are pre-norm encoder-decoders with RMSNorm, bias-free projections, bucketed
relative position biases in the self-attentions and a head tied to the one token
table. Exact only for the HF settings below; the others are refused by name:

- attention scores: HF's are not divided by sqrt(head_dim), Conveyor's are. The factor
  is folded into every q projection (``TensorMap.scale``); for a head_dim that is a
  power of 4 (T5's 64) it is a power of two, so import then export is bit-identical.
- relative bias: HF keeps one table per stack, in its first layer, that every layer
  reads; Conveyor keeps a table per layer. Import copies it into each; export writes
  it once and refuses a model whose tables differ (e.g. after training in Conveyor).
- MLP: Conveyor's gated MLP is SwiGLU, HF's ``feed_forward_proj="gated-silu"``, or with
  ``activation="gelu_tanh"`` T5 v1.1's "gated-gelu"; the original "relu" (not gated) has
  no Conveyor equivalent.
- head: transformers 5 always ties ``lm_head`` to ``shared``, and scales the decoder
  output by d_model**-0.5 unless the saved ``tie_word_embeddings`` is false (which 5.x
  keeps as ``scale_decoder_outputs``). Conveyor never scales: only an unscaled, tied
  model maps. Export writes that false flag, which 4.x reads as untied: ``lm_head`` is
  written too, a copy of ``shared``, so 4.x computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from conveyor.config import ConfigError, ModelConfig
from conveyor.models.hf import SHAPE_FIELDS, HFFamily, TensorMap, hf_field, refuse

__all__ = ["T5_HF"]

# What T5Config assumes for a field its config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
    "num_decoder_layers": None, "num_heads": 8, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu", "n_positions": 512, "initializer_range": 0.02,
}
_BUCKETS, _MAX_DISTANCE = 32, 128  # fixed in Conveyor's RelativePositionBias
# HF's gated MLPs -> ModelConfig.activation of the gate (HF's gated-gelu is "gelu_new")
_GATES = {"gated-silu": "silu", "gated-gelu": "gelu_tanh"}


def _scaled_output(raw: Mapping[str, Any]) -> bool:
    """Whether HF multiplies the decoder output by d_model**-0.5 (5.x field, else 4.x tying)."""
    if "scale_decoder_outputs" in raw:
        return bool(raw["scale_decoder_outputs"])
    return raw.get("tie_word_embeddings", True) is not False


def config_from_hf(raw: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a T5ForConditionalGeneration config.json; ConfigError if it has none."""
    def get(key: str) -> Any:
        return hf_field(raw, key, _DEFAULTS[key])

    if get("feed_forward_proj") not in _GATES:
        raise refuse(where, "feed_forward_proj", get("feed_forward_proj"),
                     "Conveyor's t5 MLP is gated: 'gated-silu' (SwiGLU) or 'gated-gelu' (GeGLU)")
    if _scaled_output(raw):
        raise refuse(where, "scale_decoder_outputs", True,
                     "Conveyor's t5 head does not rescale the decoder output by d_model**-0.5 "
                     "(save the config with tie_word_embeddings=false)")
    for key, want in (("relative_attention_num_buckets", _BUCKETS),
                      ("relative_attention_max_distance", _MAX_DISTANCE)):
        if get(key) != want:
            raise refuse(where, key, get(key), f"Conveyor's relative bias uses {want}")
    d_model, n_heads, layers = get("d_model"), get("num_heads"), get("num_layers")
    if get("d_kv") * n_heads != d_model:
        raise refuse(where, "d_kv", get("d_kv"),
                     f"Conveyor's heads are d_model/num_heads = {d_model // n_heads} wide")
    if get("num_decoder_layers") not in (None, layers):
        raise refuse(where, "num_decoder_layers", get("num_decoder_layers"),
                     f"Conveyor's t5 has as many decoder layers as encoder ones ({layers})")
    return ModelConfig(
        family="t5",
        flavour="llama",
        vocab_size=get("vocab_size"),
        n_layers=layers,
        d_model=d_model,
        n_heads=n_heads,
        d_ff=get("d_ff"),
        max_seq_len=get("n_positions"),
        tie_embeddings=True,
        norm_eps=float(get("layer_norm_epsilon")),
        init_std=float(get("initializer_range")),
        activation=_GATES[get("feed_forward_proj")],  # type: ignore[arg-type]
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The T5Config fields of ``cfg`` (shape only); ConfigError for an untied head."""
    if not cfg.tie_embeddings:
        raise ConfigError("tie_embeddings=False has no equivalent in Hugging Face's "
                          "T5ForConditionalGeneration (transformers 5 always ties lm_head to "
                          "shared); export a t5 model trained with --tie-embeddings")
    proj = {act: name for name, act in _GATES.items()}.get(cfg.act)
    if proj is None:
        raise ConfigError(f"activation={cfg.act!r} has no equivalent in Hugging Face's "
                          "T5ForConditionalGeneration, whose gated MLPs are 'gated-silu' and "
                          "'gated-gelu'; train with activation silu or gelu_tanh")
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.ffn_dim,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": _BUCKETS,
        "relative_attention_max_distance": _MAX_DISTANCE,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": proj,
        "is_encoder_decoder": True,
        "n_positions": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        # false is what tells transformers not to rescale the decoder output (it ties anyway)
        "tie_word_embeddings": False,
        "scale_decoder_outputs": False,
        "decoder_start_token_id": 0,  # hf_io writes the pad span corruption trained with
        "use_cache": True,
    }


def _attention(ours: str, theirs: str, cfg: ModelConfig) -> list[TensorMap]:
    d = cfg.d_model
    return [
        TensorMap(f"{ours}.q.weight", (f"{theirs}.q.weight",), scale=math.sqrt(cfg.head_dim)),
        TensorMap(f"{ours}.kv.weight", (f"{theirs}.k.weight", f"{theirs}.v.weight"), sizes=(d, d)),
        TensorMap(f"{ours}.out.weight", (f"{theirs}.o.weight",)),
    ]


def _mlp(ours: str, theirs: str) -> list[TensorMap]:
    return [TensorMap(f"{ours}.mlp.w1.weight", (f"{theirs}.DenseReluDense.wi_0.weight",)),
            TensorMap(f"{ours}.mlp.w3.weight", (f"{theirs}.DenseReluDense.wi_1.weight",)),
            TensorMap(f"{ours}.mlp.w2.weight", (f"{theirs}.DenseReluDense.wo.weight",))]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Conveyor parameter <- T5ForConditionalGeneration tensor(s), for every parameter of ``cfg``."""
    n = cfg.n_layers
    maps = [TensorMap("blocks.0.tok.weight", ("shared.weight",))]
    for stack, first in (("encoder", 1), ("decoder", n + 2)):
        table = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        for i in range(n):
            ours, theirs = f"blocks.{first + i}", f"{stack}.block.{i}.layer"
            maps += [TensorMap(f"{ours}.norm1.weight", (f"{theirs}.0.layer_norm.weight",)),
                     *_attention(f"{ours}.attn", f"{theirs}.0.SelfAttention", cfg),
                     TensorMap(f"{ours}.attn.relative.table.weight", (table,))]
            if stack == "decoder":
                maps += [TensorMap(f"{ours}.norm_cross.weight", (f"{theirs}.1.layer_norm.weight",)),
                         *_attention(f"{ours}.cross", f"{theirs}.1.EncDecAttention", cfg)]
            mlp = f"{theirs}.{2 if stack == 'decoder' else 1}"
            maps += [TensorMap(f"{ours}.norm2.weight", (f"{mlp}.layer_norm.weight",)),
                     *_mlp(ours, mlp)]
    maps += [TensorMap(f"blocks.{n + 1}.norm.weight", ("encoder.final_layer_norm.weight",)),
             TensorMap(f"blocks.{2 * n + 2}.norm.weight", ("decoder.final_layer_norm.weight",))]
    return maps  # the head is tied: lm_head is shared (tie_embeddings is required)


T5_HF = HFFamily(
    flavour="llama",
    family="t5",
    architecture="T5ForConditionalGeneration",
    model_type="t5",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    exported_fields=SHAPE_FIELDS | {"rope_theta", "activation"},  # rope_theta: t5 has no rotary
    store_tied_head=True,
    # copies of shared (4.x saved them) and a table transformers itself never reads
    ignored=(r"(encoder|decoder)\.embed_tokens\.weight",
             r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
)
