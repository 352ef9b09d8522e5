"""Each block's forward + backward seconds on this machine: partition costs from a profile.

The analytic model counts matmul FLOPs; on a CPU the head's softmax, the embedding's
scatter-add backward and the norms cost time FLOPs do not show. ``--partition-costs
profile`` times every block alone on one microbatch instead (one thread, as each rank
runs): the input is a detached tensor of the block's boundary shape, the backward
gets a grad of its output's shape, the head's includes its cross-entropy. A few
repetitions after a warm-up, the median of each block; seconds are what
``partition.by_cost`` balances.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from conveyor.config import ModelConfig
from conveyor.models import build_blocks
from conveyor.threads import intra_op_threads

__all__ = ["profile_block_costs", "thread_speedups"]


def _time_block(block: torch.nn.Module, x: Tensor, targets: Tensor | None) -> tuple[float, Tensor]:
    """Seconds of one forward + backward of ``block`` on ``x``; its output (detached)."""
    t0 = time.perf_counter()
    out = block(x)
    if targets is not None:  # the head: its loss is part of its work
        F.cross_entropy(out.float().flatten(0, -2), targets.flatten()).backward()
    elif out.requires_grad:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t0, out.detach()


def profile_block_costs(cfg: ModelConfig, *, microbatch_size: int, seq_len: int,
                        reps: int = 3, seed: int = 0, threads: int = 1) -> tuple[float, ...]:
    """Median seconds of forward + backward of every block (embedding, layers, head)."""
    if microbatch_size < 1 or not 1 <= seq_len <= cfg.max_seq_len or reps < 1:
        raise ValueError(f"microbatch_size={microbatch_size}, seq_len={seq_len} and reps={reps} "
                         f"must be >= 1 (seq_len <= max_seq_len={cfg.max_seq_len})")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(cfg.vocab_size, (microbatch_size, seq_len), generator=gen)
    blocks = build_blocks(cfg, seed)
    last = len(blocks) - 1
    times: list[list[float]] = [[] for _ in blocks]
    with intra_op_threads(threads):
        for rep in range(reps + 1):  # the first pass warms up allocator and kernels
            x: Tensor = tokens
            for i, block in enumerate(blocks):
                inp = x if i == 0 else x.requires_grad_(True)
                seconds, x = _time_block(block, inp, tokens if i == last else None)
                if rep:
                    times[i].append(seconds)
    return tuple(statistics.median(t) for t in times)


def thread_speedups(cfg: ModelConfig, *, microbatch_size: int, seq_len: int, max_threads: int,
                    reps: int = 3, seed: int = 0) -> tuple[float, ...]:
    """How much faster a one-layer model's forward + backward runs on k threads, k = 1..max_threads.

    What ``CostModel.thread_speedup`` needs to predict ``--lend-cores``: the embedding, a
    layer and the head together stand for the mix of work a lent stage action does.
    """
    one_layer = dataclasses.replace(cfg, n_layers=1)
    seconds = [sum(profile_block_costs(one_layer, microbatch_size=microbatch_size,
                                       seq_len=seq_len, reps=reps, seed=seed, threads=k))
               for k in range(1, max_threads + 1)]
    return tuple([1.0] + [seconds[0] / t for t in seconds[1:]])
