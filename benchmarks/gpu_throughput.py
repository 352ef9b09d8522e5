"""Single-GPU training throughput and MFU: Conveyor (pp=1) beside a plain PyTorch loop.

    python benchmarks/gpu_throughput.py [--models gpt2-124m,llama-1b] [--steps 10]

Both sides train the same model (same blocks, same seed, same batch) in bf16 autocast
with fp32 weights and AdamW state, gradient clipping at 1.0, one optimizer step per
global batch:

- ``plain``: ``Transformer`` (the flat block list in one module), forward, mean
  cross-entropy, backward, ``clip_grad_norm_``, ``AdamW.step``; with ``compile`` the
  whole model goes through ``torch.compile``, as a user of a plain loop would write it.
- ``conveyor``: ``Pipeline`` with pp=1 (one microbatch: the same work), the project's
  clipping and optimizer builder; with ``compile`` every block is compiled (``--compile``).

One JSON line per (model, implementation, compile) on stdout. Fields: median_step_s
(over ``--steps`` timed steps after ``--warmup``), tokens_per_s, tflops (model FLOPs per
second: 3x the analytic forward FLOPs of ``models.block_forward_flops``, which counts
2 FLOPs per multiply-add, causal attention at half of full), mfu (tflops / the device's
dense bf16 peak), peak_mem_gib (``torch.cuda.max_memory_allocated``), loss (last step),
vs_plain (our tokens/s over the plain loop's with the same compile setting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.models import block_forward_flops
from conveyor.models.transformer import Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.pipeline import Pipeline
from conveyor.train.clip import clip_global_grad_norm
from conveyor.train.optim import build_optimizer

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, SXM parts)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    batch: int
    seq: int


PRESETS = {
    # GPT-2 small: 124M parameters, tied head
    "gpt2-124m": Preset(ModelConfig(flavour="gpt2", vocab_size=50257, n_layers=12, d_model=768,
                                    n_heads=12, max_seq_len=1024, tie_embeddings=True), 16, 1024),
    # Llama 3.2 1B's shape: 1.24B parameters, GQA 32/8 heads, tied head
    "llama-1b": Preset(ModelConfig(flavour="llama", vocab_size=128256, n_layers=16, d_model=2048,
                                   n_heads=32, n_kv_heads=8, d_ff=8192, max_seq_len=2048,
                                   rope_theta=500000.0, tie_embeddings=True), 4, 2048),
}


def _peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters of each block, counted on the meta device (nothing allocated)."""
    from conveyor.models import build_blocks

    with torch.device("meta"):
        return [sum(p.numel() for p in b.parameters()) for b in build_blocks(cfg, 0)]


def _time_steps(step: Any, steps: int, warmup: int) -> tuple[list[float], float]:
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, loss


def _plain(preset: Preset, data: tuple, compiled: bool, steps: int, warmup: int) -> tuple:
    model = Transformer(preset.model, seed=0).cuda()
    run = torch.compile(model) if compiled else model
    opt = build_optimizer(model.named_parameters(), lr=1e-4, weight_decay=0.1)
    x, y = data

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = run(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return _time_steps(step, steps, warmup)


def _conveyor(preset: Preset, data: tuple, compiled: bool, steps: int, warmup: int) -> tuple:
    mesh = Mesh.build(1, device_type="cuda")
    par = ParallelConfig(pp=1, microbatches=1, compile=compiled)
    pipe = Pipeline(preset.model, par, mesh, seed=0, device=torch.device("cuda"),
                    autocast_dtype=torch.bfloat16)
    opt = build_optimizer(pipe.named_parameters(), lr=1e-4, weight_decay=0.1)
    x, y = data

    def step() -> float:
        pipe.zero_grad()
        loss = pipe.train_step(x, y)
        clip_global_grad_norm(pipe.parameters(), 1.0)
        opt.step()
        return loss

    return _time_steps(step, steps, warmup)


def main(argv: list[str] | None = None) -> None:
    """Run every (model, implementation, compile) case and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2-124m,llama-1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=("both", "on", "off"), default="both")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (default: from its name)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput: needs a CUDA device")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    peak = _peak_tflops(args.peak_tflops)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    for name in args.models.split(","):
        preset = PRESETS[name]
        cfg, B, T = preset.model, preset.batch, preset.seq
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(cfg.vocab_size, (B, T + 1), generator=gen).cuda()
        data = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
        flops = 3 * B * sum(block_forward_flops(cfg, T))
        # a tied head shares the embedding's matrix: count it once
        params = sum(_param_counts(cfg)) - cfg.tie_embeddings * cfg.vocab_size * cfg.d_model
        plain_tps: dict[bool, float] = {}
        for impl, fn in (("plain", _plain), ("conveyor", _conveyor)):
            for compiled in modes:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                times, loss = fn(preset, data, compiled, args.steps, args.warmup)
                med = statistics.median(times)
                tps = B * T / med
                if impl == "plain":
                    plain_tps[compiled] = tps
                tflops = flops / med / 1e12
                row = {
                    "model": name, "impl": impl, "compile": compiled, "params": params,
                    "batch": B, "seq": T, "median_step_s": round(med, 4),
                    "tokens_per_s": round(tps), "tflops": round(tflops, 1),
                    "mfu": round(tflops / peak, 4) if peak else None,
                    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "loss": round(loss, 4),
                    "vs_plain": round(tps / plain_tps[compiled], 3) if compiled in plain_tps else None,
                    "wall_s_incl_build_and_compile": round(time.perf_counter() - t0, 1),
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                }
                print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
