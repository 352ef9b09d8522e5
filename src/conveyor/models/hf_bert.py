"""BERT (``BertForMaskedLM``, ``BertForPreTraining``, ``BertForSequenceClassification``)
<-> Conveyor's ``bert`` family.

Hugging Face's BERT is Conveyor's bert family, gpt2 flavour, with the model options
``norm_position="post"`` (LayerNorm after each residual add, no final norm),
``activation="gelu"`` (HF's ``hidden_act``: the erf GELU by default) and ``head_bias``
(the MLM decoder's bias, ``cls.predictions.bias``). Import sets them; export refuses a
pre-norm model by name (no HF BERT computes it). Storage differences: HF keeps query,
key and value apart (Conveyor stacks key and value into ``kv``), and ties the decoder
to the word embeddings by default.

``BertForMaskedLM`` has no pooler and no next-sentence classifier: import starts
Conveyor's (``HFFamily.absent``) as a fresh model would, export leaves them out.
``BertForPreTraining`` holds both, so it converts exactly (import only).
``BertForSequenceClassification`` is a fine-tuned classifier (``num_labels`` > 0): its
pooler and ``classifier`` are the classification head's. Dropout is dropped on import
and written as 0 on export, as for GPT-2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from conveyor.config import ConfigError, ModelConfig
from conveyor.models.hf import (
    SHAPE_FIELDS,
    TO_HF_ACTIVATION,
    HFFamily,
    TensorMap,
    activation_from_hf,
    hf_field,
    refuse,
)

__all__ = ["BERT_MLM", "BERT_PRETRAINING", "BERT_CLASSIFIER", "NUM_SEGMENTS"]

NUM_SEGMENTS = 2  # Conveyor's segment table (sentence A, sentence B): HF's type_vocab_size

# What BertConfig assumes for a field its config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
    "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "is_decoder": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}


def config_from_hf(raw: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a BERT config.json; ConfigError if it has no equivalent."""
    def get(key: str) -> Any:
        return hf_field(raw, key, _DEFAULTS[key])

    act = activation_from_hf(get("hidden_act"), where)
    for key, want, why in (
        ("type_vocab_size", NUM_SEGMENTS, "Conveyor's bert has two segments (sentence A, B)"),
        ("position_embedding_type", "absolute", "Conveyor's bert learns absolute positions"),
        ("is_decoder", False, "Conveyor's bert is a bidirectional encoder"),
        ("add_cross_attention", False, "Conveyor's bert has no cross-attention"),
    ):
        if get(key) != want:
            raise refuse(where, key, get(key), why)
    d_model, d_ff = get("hidden_size"), get("intermediate_size")
    fields: dict[str, Any] = {}
    labels = raw.get("id2label")
    if "BertForSequenceClassification" in (raw.get("architectures") or []):
        if "num_labels" not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ConfigError(f"{where}: BertForSequenceClassification needs ModelConfig."
                              "num_labels, which this Conveyor does not have yet")
        fields["num_labels"] = len(labels) if isinstance(labels, dict) else 2
    return ModelConfig(
        family="bert",
        flavour="gpt2",
        vocab_size=get("vocab_size"),
        n_layers=get("num_hidden_layers"),
        d_model=d_model,
        n_heads=get("num_attention_heads"),
        d_ff=None if d_ff == 4 * d_model else d_ff,
        max_seq_len=get("max_position_embeddings"),
        # a classifier has no LM head to tie (tie_word_embeddings is BertConfig's default)
        tie_embeddings=bool(get("tie_word_embeddings")) and not fields,
        norm_eps=float(get("layer_norm_eps")),
        init_std=float(get("initializer_range")),
        norm_position="post",
        activation=act,  # type: ignore[arg-type]
        head_bias=True,
        **fields,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The BertConfig fields of ``cfg`` (shape only); ConfigError for a pre-norm model."""
    if cfg.norm_position != "post":
        raise ConfigError(
            f"norm_position={cfg.norm_position!r} has no equivalent in Hugging Face's BERT, "
            "which is post-norm; train the model with norm_position = \"post\" in the [model] "
            "table of --config (the options of an imported BERT), or keep the Conveyor format"
        )
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": TO_HF_ACTIVATION[cfg.act],
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": NUM_SEGMENTS,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,  # false for a classifier: nothing to tie
        **_label_fields(int(getattr(cfg, "num_labels", 0) or 0)),
    }


def _label_fields(num_labels: int) -> dict[str, Any]:
    """A classifier's labels as HF names them (``write_hf`` puts in the run's own names)."""
    if not num_labels:
        return {}
    names = {i: f"LABEL_{i}" for i in range(num_labels)}
    return {"id2label": names, "label2id": {n: i for i, n in names.items()}}


def _linear(ours: str, theirs: str) -> list[TensorMap]:
    return [TensorMap(f"{ours}.weight", (f"{theirs}.weight",)),
            TensorMap(f"{ours}.bias", (f"{theirs}.bias",))]


def _encoder_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Embeddings and layers: ``bert.*``, the same in every BERT architecture."""
    emb = "bert.embeddings"
    maps = [TensorMap("blocks.0.tok.weight", (f"{emb}.word_embeddings.weight",)),
            TensorMap("blocks.0.pos.weight", (f"{emb}.position_embeddings.weight",)),
            TensorMap("blocks.0.seg.weight", (f"{emb}.token_type_embeddings.weight",)),
            *_linear("blocks.0.norm", f"{emb}.LayerNorm")]
    d = cfg.d_model
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i + 1}", f"bert.encoder.layer.{i}"
        att = f"{theirs}.attention"
        maps += [
            *_linear(f"{ours}.attn.q", f"{att}.self.query"),
            *(TensorMap(f"{ours}.attn.kv.{kind}",
                        (f"{att}.self.key.{kind}", f"{att}.self.value.{kind}"), sizes=(d, d))
              for kind in ("weight", "bias")),
            *_linear(f"{ours}.attn.out", f"{att}.output.dense"),
            *_linear(f"{ours}.norm1", f"{att}.output.LayerNorm"),  # post-norm: after the add
            *_linear(f"{ours}.mlp.up", f"{theirs}.intermediate.dense"),
            *_linear(f"{ours}.mlp.down", f"{theirs}.output.dense"),
            *_linear(f"{ours}.norm2", f"{theirs}.output.LayerNorm"),
        ]
    return maps


def _mlm_maps(cfg: ModelConfig) -> list[TensorMap]:
    head = f"blocks.{cfg.num_blocks - 1}"
    maps = [*_encoder_maps(cfg),
            *_linear(f"{head}.transform", "cls.predictions.transform.dense"),
            *_linear(f"{head}.transform_norm", "cls.predictions.transform.LayerNorm"),
            TensorMap(f"{head}.proj.bias", ("cls.predictions.bias",))]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(f"{head}.proj.weight", ("cls.predictions.decoder.weight",)))
    return maps


def _pretraining_maps(cfg: ModelConfig) -> list[TensorMap]:
    head = f"blocks.{cfg.num_blocks - 1}"
    return [*_mlm_maps(cfg), *_linear(f"{head}.pooler", "bert.pooler.dense"),
            *_linear(f"{head}.nsp", "cls.seq_relationship")]


def _classifier_maps(cfg: ModelConfig) -> list[TensorMap]:
    head = f"blocks.{cfg.num_blocks - 1}"
    return [*_encoder_maps(cfg), *_linear(f"{head}.pooler", "bert.pooler.dense"),
            *_linear(f"{head}.classifier", "classifier")]


_FIELDS = SHAPE_FIELDS | {"rope_theta", "n_kv_heads", "norm_position", "activation", "head_bias",
                          "num_labels"}
_IGNORED = (r"bert\.embeddings\.position_ids",)  # a saved buffer of older transformers
_BERT = HFFamily(
    flavour="gpt2",
    family="bert",
    architecture="BertForMaskedLM",
    model_type="bert",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=_mlm_maps,
    exported_fields=_FIELDS,
    ignored=_IGNORED,
    head="cls.predictions.decoder.weight",
    # transformers 4 ties the decoder's bias to this one always, 5 only with the weights
    copies={"cls.predictions.bias": "cls.predictions.decoder.bias"},
    absent=(r"blocks\.\d+\.(pooler|nsp)\.(weight|bias)",),
)
BERT_MLM = _BERT
"""BertForMaskedLM: the masked LM; Conveyor's pooler and NSP classifier have no HF side."""

BERT_PRETRAINING = dataclasses.replace(
    _BERT, architecture="BertForPreTraining", tensor_maps=_pretraining_maps, absent=(),
    exports=False)
"""BertForPreTraining: masked LM and next-sentence head, every tensor mapped (import only)."""

BERT_CLASSIFIER = dataclasses.replace(
    _BERT, architecture="BertForSequenceClassification", tensor_maps=_classifier_maps,
    absent=(), labels=True, copies={})
"""BertForSequenceClassification: the fine-tuned classifier (ModelConfig.num_labels > 0)."""
