"""Profiled costs: time the real blocks of each stage on this machine, in one process.

Each stage's blocks are built as the runtime builds them and run on one random
microbatch with one thread, as each pipeline rank uses one thread. Per stage:

- **F**: the stage's forward (the last stage includes the loss).
- **I** and **W** (``b`` and ``w``): timed the way the runtime runs them: the stage's
  linear layers defer their weight-grads to a
  :class:`~conveyor.models.linear.WeightGradStore` during I, and W runs that store.
  Splitting costs a little more than one backward (the deferred work reads its
  inputs again), and the simulator should see that.
- **B** (``full_b``): one whole ``backward`` without a store, what a full-backward
  action costs. Each backward is timed on its own fresh forward graph.
- **activation bytes**: storages saved for backward during one forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters
  and buffers excluded; the stage's received input is included (the runtime stashes it).
- **link**: gloo between processes on localhost cannot be timed in one process, so the
  constants measured once in :mod:`conveyor.sim.analytic` are used.

Times are medians of ``repeats`` runs after ``warmup`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from conveyor.config import ModelConfig
from conveyor.memory import count_saved_bytes
from conveyor.models import build_blocks, lm_loss
from conveyor.models.linear import WeightGradStore, attach_weight_grad_store
from conveyor.parallel.partition import Partition

from .analytic import GLOO_LOCALHOST_BANDWIDTH_BPS, GLOO_LOCALHOST_LATENCY_S
from .cost import CostError, CostModel

__all__ = ["StageProfile", "profile_stage", "profile_costs"]


@dataclass(frozen=True)
class StageProfile:
    """Measured costs of one stage on one microbatch."""

    f: float
    b: float
    w: float
    full_b: float
    activation_bytes: int
    param_bytes: int
    output_bytes: int


def profile_stage(
    blocks: list[nn.Module],
    *,
    first: bool,
    last: bool,
    cfg: ModelConfig,
    microbatch_size: int,
    seq_len: int,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
) -> StageProfile:
    """Time F, B, I and W of ``blocks`` (one stage) and count what its forward stashes."""
    gen = torch.Generator().manual_seed(seed)
    shape = (microbatch_size, seq_len)
    tokens = torch.randint(cfg.vocab_size, shape, generator=gen)
    targets = torch.randint(cfg.vocab_size, shape, generator=gen)
    hidden = torch.randn(*shape, cfg.d_model, generator=gen)
    params = list({id(p): p for b in blocks for p in b.parameters()}.values())
    grad_out: Tensor | None = None

    def forward() -> tuple[Tensor, Tensor]:
        """Return (the tensor a backward differentiates w.r.t., the stage's output or loss)."""
        if first:
            h = blocks[0](tokens)
            wrt, rest = h, blocks[1:]
        else:
            h = wrt = hidden.detach().requires_grad_(True)
            rest = blocks
        for block in rest:
            h = block(h)
        return wrt, (lm_loss(h, targets) if last else h)

    wrt, out = forward()
    if not last:
        grad_out = torch.randn(out.shape, generator=gen)
    output_bytes = 0 if last else out.numel() * out.element_size()

    f_times, b_times, w_times, full_times = [], [], [], []
    clock = time.perf_counter
    store = WeightGradStore()
    for i in range(warmup + repeats):
        # each backward consumes its own fresh forward graph, as in a real step
        t0 = clock()
        wrt, out = forward()
        t1 = clock()
        torch.autograd.backward(out, grad_out)
        t2 = clock()
        for block in blocks:
            attach_weight_grad_store(block, store)
        wrt, out = forward()
        t3 = clock()
        with store.collect(0):
            torch.autograd.backward(out, grad_out)
        t4 = clock()
        store.flush(0)
        t5 = clock()
        for block in blocks:
            attach_weight_grad_store(block, None)
        for p in params:
            p.grad = None
        if i >= warmup:
            f_times += [t1 - t0, t3 - t2]
            full_times.append(t2 - t1)
            b_times.append(t4 - t3)
            w_times.append(t5 - t4)

    return StageProfile(
        f=statistics.median(f_times),
        b=statistics.median(b_times),
        w=statistics.median(w_times),
        full_b=statistics.median(full_times),
        activation_bytes=_saved_bytes(forward, blocks),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        output_bytes=output_bytes,
    )


def _saved_bytes(forward: Callable[[], object], blocks: list[nn.Module]) -> int:
    """Bytes of the storages autograd saves in one forward, weights and buffers excluded."""
    with count_saved_bytes(blocks) as saved:
        forward()
    return saved.total


def profile_costs(
    cfg: ModelConfig,
    partition: Partition,
    *,
    microbatch_size: int,
    seq_len: int,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 5,
    optimizer_states: int = 2,
) -> CostModel:
    """Measure every stage of ``cfg`` split by ``partition``; return a CostModel in seconds."""
    if partition.num_blocks != cfg.num_blocks:
        raise CostError(
            f"partition {partition} covers {partition.num_blocks} blocks but the model has "
            f"{cfg.num_blocks} (n_layers={cfg.n_layers} + embedding + head); "
            f"build the partition with num_blocks={cfg.num_blocks}"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each pipeline rank runs on one thread
    try:
        stages = [
            profile_stage(
                build_blocks(cfg, seed, partition.blocks_of(s)),
                first=s == 0,
                last=s == partition.num_stages - 1,
                cfg=cfg,
                microbatch_size=microbatch_size,
                seq_len=seq_len,
                warmup=warmup,
                repeats=repeats,
                seed=seed + s,
            )
            for s in range(partition.num_stages)
        ]
    finally:
        torch.set_num_threads(threads)
    message = max((s.output_bytes for s in stages), default=0)
    if message == 0:  # a single stage sends nothing; size the message as a hidden state
        message = microbatch_size * seq_len * cfg.d_model * 4
    return CostModel(
        f=tuple(s.f for s in stages),
        b=tuple(s.b for s in stages),
        w=tuple(s.w for s in stages),
        full_b=tuple(s.full_b for s in stages),
        activation_bytes=tuple(s.activation_bytes for s in stages),
        param_bytes=tuple(s.param_bytes for s in stages),
        # gradients and optimizer moments in fp32, one each per parameter element
        optimizer_bytes=tuple(s.param_bytes * (1 + optimizer_states) for s in stages),
        latency_s=GLOO_LOCALHOST_LATENCY_S,
        bandwidth_Bps=GLOO_LOCALHOST_BANDWIDTH_BPS,
        message_bytes=message,
        source=f"profiled on cpu, 1 thread, median of {repeats}",
    )
