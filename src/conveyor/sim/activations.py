"""Activation memory per block under tensor parallelism, sequence parallelism and recompute.

The structure is Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Sec. 4): per layer, what autograd keeps splits into a
part every tensor-parallel rank holds in full (the layer input, norm outputs,
residual: divided by tp only under sequence parallelism), a part tp divides (q, k,
v, the attention output, the MLP hidden tensors) and the attention core's own
saved tensors, which selective recomputation drops; full recomputation keeps only
each layer's input. Their count (34 s b h + 5 a s^2 b bytes, fp16, with dropout and
an unfused softmax) is for Megatron's kernels; the terms here are what this
project's layers save, tensor by tensor, so that the prediction matches the
runtime's meter (``memory.count_saved_bytes``): no dropout, a fused causal SDPA
kernel (no s x s matrix, a log-sum-exp per head and position), and under sequence
parallelism the column layers keep their all-gathered input. Sizes are elements
per token, times ``dtype_bytes``; token ids and targets are int64.
"""

from __future__ import annotations

from typing import Literal

from conveyor.config import ModelConfig

__all__ = ["RECOMPUTE", "Recompute", "block_activations", "layer_elements", "recompute_mode"]

Recompute = Literal["none", "selective", "full"]
RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")


def recompute_mode(value: bool | str) -> Recompute:
    """``ParallelConfig.recompute`` (False, True, 'selective', or a mode name) as a mode name."""
    if value is True or value == "full":
        return "full"
    if value is False or value == "none":
        return "none"
    if value == "selective":
        return "selective"
    raise ValueError(f"recompute={value!r} is not one of {', '.join(RECOMPUTE)}")


def layer_elements(
    cfg: ModelConfig, *, tp: int = 1, sequence_parallel: bool = False,
    recompute: Recompute = "none",
) -> float:
    """Elements one transformer block keeps for backward per token (of the full sequence)."""
    D, t = cfg.d_model, tp
    sp = t if sequence_parallel else 1
    if recompute == "full":
        return D / sp  # the block's input only: the block runs again in backward
    llama = cfg.flavour == "llama"
    # every rank's part: layer input and the residual after attention, each norm's
    # saved statistics (and llama's normalised input before the gain), /tp under SP
    stats = 1 if llama else 2
    replicated = (2 * D + 2 * stats + (2 * D if llama else 0)) / sp
    # the norm outputs: inputs of column layers, kept whole (all-gathered under SP)
    replicated += 2 * D
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    # split by tp: the qkv projection's output and the attention output (the out
    # projection's input), then the MLP's hidden tensors
    split = q + 2 * kv + D + (4 if llama else 2) * cfg.ffn_dim
    if recompute == "none":
        split += _core_elements(cfg)
    return replicated + split / t


def _core_elements(cfg: ModelConfig) -> float:
    # what the attention core saves beyond its q, k, v inputs: the kernel's log-sum-exp
    # per head, and under rotary the rotated q and k (expanded k and v with grouped
    # heads, which then replace the projection's output as the kernel's inputs)
    lse = cfg.n_heads
    if cfg.flavour != "llama":
        return lse
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    if cfg.kv_heads == cfg.n_heads:
        return lse + q + kv
    return lse + q + 2 * q - (q + 2 * kv)


def block_activations(
    cfg: ModelConfig, microbatch_size: int, seq_len: int, *, tp: int = 1,
    sequence_parallel: bool = False, recompute: Recompute = "none", dtype_bytes: int = 4,
) -> list[float]:
    """Bytes each block (embedding, layers, head) keeps per microbatch on one tp rank."""
    tokens = microbatch_size * seq_len
    layer = tokens * dtype_bytes * layer_elements(
        cfg, tp=tp, sequence_parallel=sequence_parallel, recompute=recompute)
    # the embedding keeps its token ids (and gpt2 its position ids, one row per sequence)
    embedding = 8.0 * tokens + (8.0 * seq_len if cfg.flavour == "gpt2" else 0.0)
    D, sp = cfg.d_model, tp if sequence_parallel else 1
    llama = cfg.flavour == "llama"
    # head: the final norm (input, statistics, llama's pre-gain product) /tp under SP,
    # its whole output (the projection's input), the fp32 logits of this rank's
    # vocabulary share, and the int64 targets
    norm = (D + (1 if llama else 2) + (D if llama else 0)) / sp + D
    head = tokens * (dtype_bytes * norm + 4.0 * cfg.vocab_size / tp + 8.0)
    return [embedding] + [layer] * cfg.n_layers + [head]
