"""Analytic costs: FLOP and byte counts of the model divided by a device's speeds.

Forward seconds of a stage = its blocks' forward FLOPs / (peak FLOP/s x efficiency),
plus the memory traffic of its element-wise work (norms, activations, softmax) where
the device gives one, plus its tensor-parallel collectives (:mod:`.comm`). Backward
costs twice the forward FLOPs (one matmul for the input-grad, one for the
weight-grad per forward matmul), split equally between I and W; I also carries
backward's element-wise work (twice the forward's traffic), its collectives and
whatever recomputation repeats; a full backward B costs I + W. Parameter counts
come from :mod:`conveyor.models`, activation bytes from :mod:`.activations`.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch

from conveyor.config import ModelConfig
from conveyor.models import block_forward_flops, block_param_counts
from conveyor.parallel.partition import Partition, stage_costs

from .activations import block_activations, recompute_mode
from .comm import (
    Collective,
    Link,
    MeshLinks,
    collective_time,
    dp_grad_collectives,
    embedding_collectives,
    head_collectives,
    layer_collectives,
)
from .cost import CostError, CostModel

__all__ = [
    "Device",
    "DEVICES",
    "GLOO_LOCALHOST_LATENCY_S",
    "GLOO_LOCALHOST_BANDWIDTH_BPS",
    "GLOO_ARRIVAL_S",
    "EXECUTOR_ACTION_S",
    "MESSAGE_COMPUTE_BPS",
    "P2P_POST_S",
    "RECV_BUFFER_BPS",
    "SEND_POST_BPS",
    "analytic_costs",
    "gloo_runtime_costs",
    "get_device",
    "measure_cpu_flops",
]

GLOO_LOCALHOST_LATENCY_S = 100e-6
"""One gloo send/recv between two processes on 127.0.0.1: half a ping-pong of a 4-byte
tensor, median of 25, measured once (torch 2.13, 2-core AMD EPYC VM): 93-100 us."""

GLOO_LOCALHOST_BANDWIDTH_BPS = 2.5e9
"""Gloo on 127.0.0.1, same measurement with 1-16 MiB tensors: 2.1-3.0 GB/s."""

# What the CPU runtime spends on communication over gloo on localhost, read off
# ``Executor.record`` timelines of pp=2 steps of every schedule on an idle machine
# (2-core Xeon VM, torch 2.13; GPT-2 with 256 KiB and with 64 KiB messages;
# ``benchmarks/sim_accuracy.py --dump``): the gap between one compute action's end and
# the next one's start (or its wait), by the sends and receives the executor posts in
# it; the time from a producing compute's end to the end of the consumer's wait; and
# each compute action's time over the same action replayed without communication
# (``sim.profile.RankReplay``) in the same processes. Costs that grow with the message
# are given as bytes per second.

P2P_POST_S = 110e-6
"""The fixed part of posting one send or receive through ``runtime.comm.P2P`` (boundary
check, ``batch_isend_irecv``): receives took 0.15 ms (64 KiB) and 0.26 ms (256 KiB)."""

RECV_BUFFER_BPS = 1.7e9
"""A receive's fresh buffer, per byte (allocating it is most of what grows with size)."""

SEND_POST_BPS = 1.2e9
"""A send's post, per byte: gloo writes the message into the socket while it is posted
(sends took 0.19 ms for 64 KiB, 0.35 ms for 256 KiB)."""

GLOO_ARRIVAL_S = 30e-6
"""From a send's post returning to its receiver's wait ending: the message is written
by then, so little is left (the producing compute's end to the wait's end was the
post plus this: medians 0.18 ms for 64 KiB, 0.35-0.38 ms for 256 KiB)."""

EXECUTOR_ACTION_S = 25e-6
"""The executor's bookkeeping between two compute actions with nothing to post
(median 0.016-0.04 ms)."""

MESSAGE_COMPUTE_BPS = 0.5e9
"""Each message also slows the compute of both its ranks, per byte and end: the
communication threads (gloo's socket I/O, the send waiter) share the rank's core and
receive buffers are faulted in as they fill. Compute actions in the runtime took
0.1 ms (64 KiB) and 0.4-0.7 ms (256 KiB) longer than replayed without messages."""


def gloo_runtime_costs(message_bytes: int) -> dict[str, float]:
    """CostModel link and executor fields for the CPU runtime on gloo over localhost."""
    return {
        "latency_s": GLOO_ARRIVAL_S,
        "bandwidth_Bps": math.inf,  # the bytes are written by the sender, while posting
        "message_bytes": message_bytes,
        "send_overhead_s": P2P_POST_S + message_bytes / SEND_POST_BPS,
        "recv_overhead_s": P2P_POST_S + message_bytes / RECV_BUFFER_BPS,
        "action_overhead_s": EXECUTOR_ACTION_S,
        "message_compute_s": message_bytes / MESSAGE_COMPUTE_BPS,
    }


@dataclass(frozen=True, kw_only=True)
class Device:
    """What the analytic model needs to know about one accelerator (or CPU core)."""

    name: str
    """Preset name, e.g. 'h100'."""
    peak_flops: float
    """Dense matmul FLOP/s at the training dtype."""
    efficiency: float
    """Share of peak the model's kernels achieve on average (MFU-like), 0 < e <= 1."""
    memory_bytes: int
    """Memory of one device, for checking that a stage fits."""
    link_bandwidth_Bps: float
    """Point-to-point bytes per second between neighbouring pipeline ranks."""
    link_latency_s: float
    """Fixed seconds per point-to-point message."""
    dtype_bytes: int = 2
    """Bytes per element of weights and activations at the training dtype."""
    gpus_per_node: int = 8
    """Devices sharing the intra-node link (``link_*``); groups spanning more use ``inter_*``."""
    inter_bandwidth_Bps: float = 25e9
    """Bytes per second each device sends to other nodes (its share of the network)."""
    inter_latency_s: float = 10e-6
    """Fixed seconds of one message between nodes."""
    memory_bandwidth_Bps: float = math.inf
    """Device memory bytes per second, for the element-wise work (inf: free)."""
    elementwise_passes: float = 0.0
    """Bytes moved by norms, activations, residuals, bias adds and the loss, per byte a
    block keeps for backward (``sim.activations``) in one forward; backward moves
    twice that. 0: folded into ``efficiency``."""
    score_bytes: float = 0.0
    """Bytes moved per attention score (per head, query and key) in one forward by
    an unfused softmax kernel; 0 for fused kernels that never write the scores."""
    copy_bandwidth_Bps: float = math.inf
    """Bytes per second a rank spends copying a data-parallel gradient bucket (flattened
    before its all-reduce, averaged and copied back after); inf: free (fused on GPUs)."""
    collectives: tuple[tuple[str, float, float], ...] = ()
    """Measured (op, per-step latency s, bandwidth B/s) of all-reduce, all-gather and
    reduce-scatter within a node, replacing the link's two numbers for them
    (``sim.gloo.CommCalibration.ring_ops``; () : the link's)."""
    attention_flops: float = 0.5
    """Share of the full s x s attention matmuls the kernels run: 0.5 when causal kernels
    skip the masked half (the convention of ``models.block_forward_flops``), 1.0 when
    they compute all scores and mask them."""

    @property
    def intra(self) -> Link:
        """The intra-node link."""
        return Link(self.link_bandwidth_Bps, self.link_latency_s, self.collectives)

    @property
    def inter(self) -> Link:
        """The inter-node link."""
        return Link(self.inter_bandwidth_Bps, self.inter_latency_s)

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise CostError(f"efficiency={self.efficiency!r} of {self.name!r} must be in (0, 1]")
        if not 0 < self.attention_flops <= 1:
            raise CostError(f"attention_flops={self.attention_flops!r} of {self.name!r} must be "
                            "in (0, 1]: 0.5 for causal kernels, 1 for full score matrices")
        if self.peak_flops <= 0:
            raise CostError(f"peak_flops={self.peak_flops!r} of {self.name!r} must be > 0")

    @property
    def achieved_flops(self) -> float:
        """FLOP/s assumed for the model: peak x efficiency."""
        return self.peak_flops * self.efficiency


DEVICES: dict[str, Device] = {
    # NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s dense bf16 tensor core, 2039 GB/s HBM2e;
    # NVLink 3 gives 600 GB/s total, 300 GB/s each way. Latency ~10 us: a small NCCL p2p
    # message. Matmul efficiency 0.63 and 0.25 element-wise passes were fitted to
    # Narayanan et al. 2021, Table 1 (docs/planner.md): with them every row is within 6%.
    "a100": Device(
        name="a100",
        peak_flops=312e12,
        efficiency=0.63,
        memory_bytes=80 * 2**30,
        link_bandwidth_Bps=300e9,
        link_latency_s=10e-6,
        # DGX A100: eight 200 Gb/s HDR InfiniBand cards, one per GPU
        inter_bandwidth_Bps=25e9,
        inter_latency_s=5e-6,
        memory_bandwidth_Bps=2.039e12,
        elementwise_passes=0.25,
    ),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity), 3.35
    # TB/s HBM3; NVLink 4 gives 900 GB/s total, 450 GB/s each way. Not calibrated against
    # measurements: matmuls are assumed to reach a smaller share of the higher peak (0.55).
    "h100": Device(
        name="h100",
        peak_flops=989e12,
        efficiency=0.55,
        memory_bytes=80 * 2**30,
        link_bandwidth_Bps=450e9,
        link_latency_s=10e-6,
        # DGX H100: eight 400 Gb/s NDR InfiniBand cards, one per GPU
        inter_bandwidth_Bps=50e9,
        inter_latency_s=5e-6,
        memory_bandwidth_Bps=3.35e12,
        elementwise_passes=0.25,
    ),
}

# Share of the measured single-thread 256^3 matmul rate that the fp32 model reaches
# on CPU (its norms, softmax and GELU run below GEMM speed). Calibrated against
# sim.profile: default ModelConfig, 4 stages, microbatch 4 x 128 tokens, 2-core AMD
# EPYC VM: forward 0.76, backward (B + W) 0.79 of the matmul rate.
CPU_EFFICIENCY = 0.75


@functools.lru_cache(maxsize=1)
def measure_cpu_flops(n: int = 256, repeats: int = 20) -> float:
    """Single-thread fp32 FLOP/s of an n x n matmul on this machine (median; cached)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each pipeline rank runs on one thread
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * n**3 / statistics.median(times)


def get_device(name: str) -> Device:
    """A preset by name: 'cpu' (this machine, measured once per process), 'a100', 'h100'."""
    if name == "cpu":
        return Device(
            name="cpu",
            peak_flops=measure_cpu_flops(),
            efficiency=CPU_EFFICIENCY,
            memory_bytes=host_memory(),
            link_bandwidth_Bps=GLOO_LOCALHOST_BANDWIDTH_BPS,
            link_latency_s=GLOO_LOCALHOST_LATENCY_S,
            dtype_bytes=4,  # CPU training runs in fp32
            gpus_per_node=1 << 20,  # every rank is a local process: one "node"
            inter_bandwidth_Bps=GLOO_LOCALHOST_BANDWIDTH_BPS,
            inter_latency_s=GLOO_LOCALHOST_LATENCY_S,
        )
    try:
        return DEVICES[name]
    except KeyError:
        raise CostError(
            f"device {name!r} is unknown; choose one of cpu, {', '.join(sorted(DEVICES))}"
        ) from None


def host_memory() -> int:
    """This machine's memory in bytes (16 GiB where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024  # first line: MemTotal in kB
    except (OSError, ValueError, IndexError):
        return 16 * 2**30  # not Linux: a laptop-sized guess only used for fit checks


def analytic_costs(
    cfg: ModelConfig,
    partition: Partition,
    *,
    microbatch_size: int,
    seq_len: int,
    device: Device | str = "cpu",
    optimizer_states: int = 2,
    tp: int = 1,
    dp: int = 1,
    sequence_parallel: bool = False,
    recompute: bool | str = False,
    dp_bucket_mb: float = 25.0,
    zero: int = 0,
    grad_bytes: int = 4,
) -> CostModel:
    """Costs of ``cfg`` split by ``partition`` on ``device``, one microbatch per action.

    Per tensor-parallel rank: matmul FLOPs / tp, plus each block's tp collectives
    (``comm.layer_collectives``) on the tp axis's link; recomputation adds the
    forward it repeats (a block's, or its attention core's) to the input-grad.
    The data-parallel reduction of each stage's ``grad_bytes``-per-element grads
    (``dp_bucket_mb`` buckets; reduce-scatter plus a parameter all-gather under
    ZeRO-1) runs on the dp axis's link. Activations and weights are
    ``device.dtype_bytes`` per element; grads and ``optimizer_states`` Adam moments
    are fp32, the moments sharded over dp under ZeRO-1.
    """
    dev = device if isinstance(device, Device) else get_device(device)
    if partition.num_blocks != cfg.num_blocks:
        raise CostError(
            f"partition {partition} covers {partition.num_blocks} blocks but the model has "
            f"{cfg.num_blocks} (n_layers={cfg.n_layers} + embedding + head); "
            f"build the partition with num_blocks={cfg.num_blocks}"
        )
    if seq_len > cfg.max_seq_len or seq_len < 1 or microbatch_size < 1:
        raise CostError(
            f"seq_len={seq_len} must be in 1..max_seq_len={cfg.max_seq_len} and "
            f"microbatch_size={microbatch_size} >= 1"
        )
    mode = recompute_mode(recompute)
    tokens = microbatch_size * seq_len
    speed = dev.achieved_flops * tp
    flops = [x * microbatch_size for x in block_forward_flops(cfg, seq_len)]
    # what backward runs again: a layer's whole forward, or its attention core's
    core = 4.0 * seq_len * seq_len * cfg.d_model * microbatch_size * dev.attention_flops
    flops = [flops[0]] + [x + core - core / dev.attention_flops / 2 for x in flops[1:-1]] + [
        flops[-1]]
    redo = [0.0] + [flops[1] if mode == "full" else core if mode == "selective" else 0.0
                    ] * cfg.n_layers + [0.0]
    # element-wise work is bound by memory traffic, not FLOPs: a forward moves
    # ``elementwise_passes`` bytes per byte a block keeps (plus an unfused softmax's
    # scores); backward twice that; recomputation repeats the forward's share
    kept = block_activations(cfg, microbatch_size, seq_len, tp=tp,
                             sequence_parallel=sequence_parallel, dtype_bytes=dev.dtype_bytes)
    scores = dev.score_bytes * cfg.n_heads / tp * seq_len * tokens
    moved = [0.0] + [dev.elementwise_passes * x + scores for x in kept[1:-1]] + [
        dev.elementwise_passes * kept[-1]]
    traffic = [x / dev.memory_bandwidth_Bps for x in moved]
    redo_traffic = [0.0] + [traffic[1] if mode == "full" else (
        scores / dev.memory_bandwidth_Bps if mode == "selective" else 0.0)] * cfg.n_layers + [0.0]
    links = MeshLinks.build(tp=tp, dp=dp, pp=partition.num_stages, gpus_per_node=dev.gpus_per_node,
                            intra=dev.intra, inter=dev.inter)

    def tp_seconds(collectives: tuple[Collective, ...]) -> float:
        return sum(collective_time(c, tp, links.tp) for c in collectives)

    kw = {"sequence_parallel": sequence_parallel, "dtype_bytes": dev.dtype_bytes}
    layer_f, layer_b = layer_collectives(tokens, cfg.d_model, **kw)
    emb_f, emb_b = embedding_collectives(tokens, cfg.d_model, **kw)
    head_f, head_b = head_collectives(tokens, cfg.d_model, **kw)
    # full recomputation repeats a layer's forward collectives inside its backward
    layer_b_all = layer_b + (layer_f if mode == "full" else ())
    comm_f = [tp_seconds(emb_f)] + [tp_seconds(layer_f)] * cfg.n_layers + [tp_seconds(head_f)]
    comm_b = [tp_seconds(emb_b)] + [tp_seconds(layer_b_all)] * cfg.n_layers + [tp_seconds(head_b)]
    tp_f = stage_costs(partition, comm_f)
    tp_b = stage_costs(partition, comm_b)
    compute = stage_costs(partition, [x / speed for x in flops])
    moving = stage_costs(partition, traffic)
    recomputed = stage_costs(partition, [x / speed + y for x, y in zip(redo, redo_traffic,
                                                                         strict=True)])
    f = tuple(c + m + t for c, m, t in zip(compute, moving, tp_f, strict=True))
    # backward's element-wise work goes with the input-grad (I); W is matmuls only
    b = tuple(c + 2 * m + r + t
              for c, m, r, t in zip(compute, moving, recomputed, tp_b, strict=True))

    params = block_param_counts(cfg)
    if cfg.tie_embeddings:
        # a tied table is one tensor when embedding and head share a stage
        shared = cfg.vocab_size * cfg.d_model
        if partition.stage_of(0) == partition.stage_of(cfg.num_blocks - 1):
            params = params[:-1] + [params[-1] - shared]
    # a tp rank holds 1/tp of the matrices (norms and biases, a small share, counted so too)
    stage_params = [int(p) // tp for p in stage_costs(partition, params)]

    reduce_s, buckets, after_s = [], [], []
    for p in stage_params:
        grads, gathered = dp_grad_collectives(
            float(p * grad_bytes), bucket_bytes=dp_bucket_mb * 2**20, zero=zero,
            param_bytes=float(p * dev.dtype_bytes))
        reduce_s.append(sum(k * (collective_time(c, dp, links.dp)
                                 + c.nbytes / dev.copy_bandwidth_Bps) for c, k in grads))
        buckets.append(max(1, sum(k for _, k in grads)))
        after_s.append(sum(collective_time(c, dp, links.dp) for c in gathered))

    acts = block_activations(cfg, microbatch_size, seq_len, tp=tp,
                             sequence_parallel=sequence_parallel, recompute=mode,
                             dtype_bytes=dev.dtype_bytes)
    moments = 4 * optimizer_states / (dp if zero else 1)
    hidden = tokens // (tp if sequence_parallel else 1) * cfg.d_model * dev.dtype_bytes
    where = f", tp={tp} dp={dp}" if tp * dp > 1 else ""
    return CostModel(
        f=f,
        b=b,
        w=compute,
        activation_bytes=tuple(int(a) for a in stage_costs(partition, acts)),
        param_bytes=tuple(p * dev.dtype_bytes for p in stage_params),
        optimizer_bytes=tuple(int(p * (4 + moments)) for p in stage_params),
        latency_s=links.pp.latency_s,
        bandwidth_Bps=links.pp.bandwidth_Bps,
        message_bytes=hidden,
        tp_f_s=tp_f if tp > 1 else (),
        tp_b_s=tp_b if tp > 1 else (),
        dp_reduce_s=tuple(reduce_s) if dp > 1 else (),
        dp_buckets=tuple(buckets) if dp > 1 else (),
        dp_after_s=tuple(after_s) if dp > 1 and zero else (),
        source=f"analytic {dev.name} ({dev.achieved_flops / 1e12:.3g} TFLOP/s achieved{where})",
    )
