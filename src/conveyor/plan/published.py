"""Published measurements the planner is checked against: Narayanan et al., SC'21.

"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
Table 1 (weak scaling on A100-80GB, sequence 2048, vocabulary 51200) and Fig. 13
(the (tensor, pipeline) trade-off for a 162.2B model on 64 GPUs). The paper counts the FLOPs of one iteration as
``96 B s l h^2 (1 + s / (6 h) + V / (16 l h))``: forward, backward and the forward
again for activation recomputation, with the full (unmasked) attention matmuls.

Assumptions, one set for every row (``MEGATRON_2021``): microbatch size 1, full
recomputation, the interleaved schedule with 2 chunks per rank when pp > 1, no
sequence parallelism (it came a year later), DGX A100 nodes (8 GPUs, NVLink
within, one 200 Gb/s HDR card per GPU between), and the kernels of the time: the
attention matmuls are run over the whole score matrix, and softmax, mask and
dropout are an unfused kernel that moves ``score_bytes`` per score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conveyor.config import ModelConfig
from conveyor.sim import Device, get_device

from .cluster import Cluster
from .estimate import Candidate, Estimate, estimate

__all__ = ["Table1Row", "TABLE1", "MEGATRON_2021", "table1_candidate", "table1_model",
           "paper_flops", "predict_table1", "FIG13_SPLITS", "FIG13_MODEL"]

SEQ, VOCAB = 2048, 51200


@dataclass(frozen=True)
class Table1Row:
    """One row of Table 1: the model, its layout and the measured throughput."""

    billions: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float
    """Achieved teraFLOP/s per GPU, as published."""


TABLE1: tuple[Table1Row, ...] = (
    Table1Row(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    Table1Row(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    Table1Row(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    Table1Row(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    Table1Row(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    Table1Row(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    Table1Row(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    Table1Row(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    Table1Row(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    Table1Row(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)
"""Narayanan et al. 2021, Table 1."""

MEGATRON_2021: Device = dataclasses.replace(
    get_device("a100"), name="a100 (Megatron-LM 2021 kernels)", attention_flops=1.0,
    score_bytes=5.0,  # fused scale-mask-softmax: read 2 + write 2 bytes, dropout mask 1 byte
)
"""The A100 preset with the attention kernels Megatron-LM ran in 2021."""


def table1_model(row: Table1Row) -> ModelConfig:
    """The GPT model of a row (untied head, as Megatron's FLOP count has V h per layer)."""
    return ModelConfig(vocab_size=VOCAB, n_layers=row.layers, d_model=row.hidden,
                       n_heads=row.heads, max_seq_len=SEQ)


def table1_candidate(row: Table1Row, *, tp: int | None = None, pp: int | None = None
                     ) -> Candidate:
    """The row's layout under the stated assumptions (tp and pp may be overridden)."""
    tp, pp = tp or row.tp, pp or row.pp
    dp = row.gpus // (tp * pp)
    v = 2 if 1 < pp and 2 * pp <= row.layers else 1
    return Candidate(tp=tp, pp=pp, dp=dp, schedule="interleaved-1f1b" if v > 1 else "1f1b",
                     virtual_stages=v, microbatch_size=1, microbatches=row.batch // dp,
                     recompute="full")


def paper_flops(row: Table1Row) -> float:
    """FLOPs of one iteration as the paper counts them (recomputation included)."""
    B, s, L, h, V = row.batch, SEQ, row.layers, row.hidden, VOCAB
    return 96.0 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def predict_table1(row: Table1Row, device: Device = MEGATRON_2021, *,
                   tp: int | None = None, pp: int | None = None) -> tuple[float, Estimate]:
    """Predicted teraFLOP/s per GPU of a row (the paper's FLOP count / predicted step)."""
    c = table1_candidate(row, tp=tp, pp=pp)
    e = estimate(table1_model(row), c, Cluster(device, row.gpus), SEQ, row.batch)
    return paper_flops(row) / (e.step_s * row.gpus) / 1e12, e


FIG13_MODEL = Table1Row(162.2, 128, 20480, 32, 8, 8, 64, 128, 0.0)
"""Fig. 13's 162.2B-parameter GPT on 64 GPUs. The shape is inferred, not quoted: hidden
20480 and 128 heads as Table 1's 529.6B row, and 32 layers, the depth at which
12 l h^2 + V h gives 162.2B (and which pp = 32, the figure's deepest split, needs).
Batch 128 is within the figure's range."""

FIG13_SPLITS: tuple[tuple[int, int], ...] = ((2, 32), (4, 16), (8, 8), (16, 4), (32, 2))
"""(tp, pp) splits of 64 GPUs compared in Fig. 13; the paper finds (8, 8) best."""
