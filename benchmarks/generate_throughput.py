"""Generation throughput and per-token latency: pipelined on the executor, the old way, one process.

    python benchmarks/generate_throughput.py [--repeats 3] [--new-tokens 32] [--pp 1 2 4]

For pp in ``--pp`` and batch (prompts) in ``--batches``, greedy, no end token, random
prompts of mixed lengths (``--min-prompt``..``--max-prompt``):

  conveyor   ``PipelinedGenerator`` on pp ranks (one thread each), the batch in
             ``min(batch, pp)`` microbatches (the default: the fewest that fill the ring);
  old        for pp > 1: the replaced one-sequence-at-a-time pipelined generation
             (``_old_generate.py``: hand-written send and token broadcast), the
             prompts one after another;
  single     for pp > 1: the whole model in one process with pp threads (the same
             total threads), the same ``PipelinedGenerator`` without a mesh.

One JSON line per case on stdout, a table on stderr. Fields: tokens_per_s (new
tokens of the batch / wall seconds, median over repeats), latency_median_s and
latency_p90_s (seconds between consecutive tokens of one sequence, where they are
sampled, over every sequence and repeat), ttft_s (median time to a sequence's
first token), wall_s_all, others_cpu (share of the cores other processes used
during the case, as ``sim_accuracy.py`` counts it: above a few percent the numbers
measure the neighbours too; it reads 0 where the ranks' own threads spin while they
wait, so read load_1m beside it) and
load_1m (on this shared 2-core machine other agents' load comes and goes: compare
within one run, and read ``wall_s_all``), oversubscribed (more threads than cores:
pp=4 here). Pipelined conveyor cases also carry the simulator's prediction of the same
run (sim_tokens_per_s, sim_latency_median_s, sim_latency_p90_s): each rank's
compute costs timed here beforehand in one thread (a stage's forward on the
microbatch shape of a prefill and of a decode round), the CPU runtime's gloo and
executor constants (``sim.analytic.gloo_runtime_costs``), and every segment
schedule the run executes, simulated one after another.

A last line compares pp=2 at the largest batch with the old generation and with the
single process (``speedup_vs_old``, ``ratio_vs_single``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _old_generate import generate_one_at_a_time  # noqa: E402
from conveyor.config import ModelConfig  # noqa: E402
from conveyor.generation import CachedBlocks  # noqa: E402
from conveyor.generation.batch import PromptBatch, Sampling  # noqa: E402
from conveyor.parallel.layout import resolve_partition  # noqa: E402
from conveyor.parallel.mesh import Mesh  # noqa: E402
from conveyor.runtime.generate import SEGMENT_ROUNDS, PipelinedGenerator, build_stage  # noqa: E402
from conveyor.runtime.launch import launch  # noqa: E402
from conveyor.schedules.generation import GenerationSegment, generation_segment  # noqa: E402
from conveyor.sim import CostModel, simulate  # noqa: E402
from conveyor.sim.analytic import gloo_runtime_costs  # noqa: E402
from sim_accuracy import _others, _Usage  # noqa: E402

GREEDY = Sampling(temperature=0, stop_at_eot=False)


@dataclass(frozen=True)
class Spec:
    """The model, the prompts and the repetitions of every case."""

    cfg: ModelConfig
    prompts: list[list[int]]  # the largest batch; smaller batches take its first prompts
    new_tokens: int
    repeats: int


def _microbatches(pp: int, batch: int) -> int:
    return min(batch, pp)


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class _Clock:
    """Timestamps of each sequence's tokens where this rank learns them."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[int, list[float]] = {}

    def __call__(self, seq: int, token: int) -> None:
        del token
        self.times.setdefault(seq, []).append(time.perf_counter() - self.start)

    def gaps(self) -> list[float]:
        return [b - a for ts in self.times.values() for a, b in zip(ts, ts[1:], strict=False)]

    def firsts(self) -> list[float]:
        return [ts[0] for ts in self.times.values()]


def _run_conveyor(gen: PipelinedGenerator, prompts: list[list[int]], spec: Spec, pp: int
                  ) -> _Clock:
    clock = _Clock()
    gen.generate(prompts, spec.new_tokens, GREEDY, microbatches=_microbatches(pp, len(prompts)),
                 on_token=clock)
    return clock


def _run_old(blocks: dict, mesh: Mesh, prompts: list[list[int]], spec: Spec) -> _Clock:
    clock = _Clock()
    for i, p in enumerate(prompts):
        generate_one_at_a_time(blocks, spec.cfg, mesh, p, spec.new_tokens, GREEDY,
                               on_token=lambda t, i=i: clock(i, t))
    return clock


def _ranks(spec: Spec, pp: int, batches: list[int]) -> dict[str, Any]:
    """On every rank: each case ``repeats`` times, round-robin; what this rank saw."""
    mesh = Mesh.build(pp)
    blocks = build_stage(spec.cfg, resolve_partition(spec.cfg, pp), mesh.pp_rank)
    gen = PipelinedGenerator(blocks, spec.cfg, mesh, timeout_s=600)
    cases = [("conveyor", b) for b in batches] + [("old", b) for b in batches]
    out: dict[str, Any] = {}
    _run_conveyor(gen, spec.prompts[:1], spec, pp)  # warm-up: caches, allocator, messages
    _run_old(blocks, mesh, spec.prompts[:1], spec)
    for _ in range(spec.repeats):
        for name, b in cases:
            prompts = spec.prompts[:b]
            dist.barrier()
            usage = _Usage()
            clock = (_run_conveyor(gen, prompts, spec, pp) if name == "conveyor"
                     else _run_old(blocks, mesh, prompts, spec))
            dist.barrier()
            wall = time.perf_counter() - clock.start
            rec = out.setdefault(f"{name}-{b}", {"wall": [], "gaps": [], "firsts": [], "usage": []})
            rec["wall"].append(wall)
            rec["gaps"] += clock.gaps()
            rec["firsts"] += clock.firsts()
            rec["usage"].append(usage.done())
    return out


def _single(spec: Spec, batches: list[int]) -> dict[str, Any]:
    """The whole model in this one process, with the threads it was started with."""
    gen = PipelinedGenerator(build_stage(spec.cfg, resolve_partition(spec.cfg, 1), 0), spec.cfg)
    _run_conveyor(gen, spec.prompts[:1], spec, 1)
    out: dict[str, Any] = {}
    for _ in range(spec.repeats):
        for b in batches:
            usage = _Usage()
            clock = _run_conveyor(gen, spec.prompts[:b], spec, 1)
            rec = out.setdefault(f"conveyor-{b}", {"wall": [], "gaps": [], "firsts": [],
                                                   "usage": []})
            rec["wall"].append(time.perf_counter() - clock.start)
            rec["gaps"] += clock.gaps()
            rec["firsts"] += clock.firsts()
            rec["usage"].append(usage.done())
    return out


# -- the simulator's prediction -------------------------------------------------------------


def _time_forward(stack_of: Any, x: torch.Tensor, start: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        stack = stack_of()
        t0 = time.perf_counter()
        stack(x, start)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def stage_costs(spec: Spec, pp: int, batch: int) -> tuple[list[float], list[float]]:
    """Seconds of each model stage's forward of one microbatch: (prefill, decode round)."""
    torch.set_num_threads(1)
    part = resolve_partition(spec.cfg, pp)
    pb = PromptBatch(spec.prompts[:batch], spec.new_tokens, spec.cfg, _microbatches(pp, batch))
    d, size = spec.cfg.d_model, pb.size
    prefill, decode = [], []
    for s in range(pp):
        blocks = build_stage(spec.cfg, part, s)

        def stack(blocks: dict = blocks) -> CachedBlocks:
            return CachedBlocks(blocks, spec.cfg, size, pb.cache_len,
                                padding=pb.padding(pb.rows(0), torch.device("cpu")))

        first = s == 0
        x_pre = pb.tokens(pb.rows(0), torch.device("cpu")) if first else torch.randn(size, pb.prompt_len, d)
        x_dec = torch.zeros(size, 1, dtype=torch.long) if first else torch.randn(size, 1, d)
        prefill.append(_time_forward(stack, x_pre, 0))
        # a decode round half way: attention over half the new tokens' cache
        decode.append(_time_forward(stack, x_dec, pb.prompt_len + spec.new_tokens // 2))
    return prefill, decode


def predict(spec: Spec, pp: int, batch: int, costs: tuple[list[float], list[float]],
            pb: Any = None) -> dict[str, float]:
    """Simulate every segment schedule of the run, one after another.

    ``pb``: the run's batch (a PromptBatch, or any with its microbatch count, size and
    budget, e.g. a Seq2SeqBatch); by default the prompts' PromptBatch.
    """
    prefill, decode = costs
    if pb is None:
        pb = PromptBatch(spec.prompts[:batch], spec.new_tokens, spec.cfg,
                         _microbatches(pp, batch))
    m = pb.num_microbatches
    total, done, gaps = 0.0, 0, []
    while done < pb.max_budget:
        rounds = min(SEGMENT_ROUNDS, pb.max_budget - done)
        seg = GenerationSegment(pp, rounds)
        f = []
        for v in range(seg.num_stages):
            r = seg.round_of(v)
            f.append(0.0 if r is None else (prefill if done + r == 0 else decode)[v % pp])
        zeros = (0,) * seg.num_stages
        msg = pb.size * spec.cfg.d_model * 4
        cost = CostModel(f=tuple(f), b=zeros, w=zeros, activation_bytes=zeros,
                         param_bytes=zeros, optimizer_bytes=zeros, source="profiled here",
                         **gloo_runtime_costs(msg if pp > 1 else 0))
        result = simulate(generation_segment(pp, rounds, m), cost)
        ends: dict[int, list[float]] = {}
        for t in result.timeline[pp - 1]:
            if t.action.kind.is_compute and seg.round_of(t.action.stage) is not None:
                ends.setdefault(t.action.microbatch, []).append(t.end)
        gaps += [b - a for es in ends.values() for a, b in zip(es, es[1:], strict=False)]
        total += result.step_time
        done += rounds
    return {"sim_tokens_per_s": round(batch * spec.new_tokens / total, 1),
            "sim_latency_median_s": _round(statistics.median(gaps) if gaps else None),
            "sim_latency_p90_s": _round(_percentile(gaps, 0.9))}


# -- reporting --------------------------------------------------------------------------


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _line(impl: str, pp: int, batch: int, threads: int, recs: list[dict[str, Any]],
          spec: Spec) -> dict[str, Any]:
    walls = [max(ws) for ws in zip(*(r["wall"] for r in recs), strict=True)]
    last = recs[-1]  # tokens are sampled on the last rank
    wall = statistics.median(walls)
    return {
        "impl": impl, "pp": pp, "batch": batch, "threads_total": threads,
        "microbatches": _microbatches(pp, batch) if impl == "conveyor" else 1,
        "new_tokens": spec.new_tokens, "tokens_per_s": round(batch * spec.new_tokens / wall, 1),
        "latency_median_s": _round(statistics.median(last["gaps"])),
        "latency_p90_s": _round(_percentile(last["gaps"], 0.9)),
        "ttft_s": _round(statistics.median(last["firsts"])),
        "wall_s_all": [round(w, 4) for w in walls],
        "others_cpu": _others([u for r in recs for u in r["usage"]]),
        "load_1m": round(os.getloadavg()[0], 2),
        "oversubscribed": threads > (os.cpu_count() or 1),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every case; print JSON lines; return them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    cfg = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model,
                      n_heads=args.heads, max_seq_len=args.max_prompt + args.new_tokens)
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(args.min_prompt,
                                                                           args.max_prompt))]
               for _ in range(max(args.batches))]
    spec = Spec(cfg, prompts, args.new_tokens, args.repeats)
    lines = []
    for pp in args.pp:
        # one process with pp threads: spawned like a rank, so it starts with them
        single = launch(_single, 1, spec, args.batches, threads_per_rank=pp, timeout_s=1800)[0]
        per_rank = ({0: single} if pp == 1 else
                    launch(_ranks, pp, spec, pp, args.batches, timeout_s=1800))
        for b in args.batches:
            for impl in ("conveyor", "old"):
                key = f"{impl}-{b}"
                if key not in per_rank[0]:
                    continue
                line = _line(impl, pp, b, pp, [per_rank[r][key] for r in sorted(per_rank)], spec)
                if impl == "conveyor":
                    line |= predict(spec, pp, b, stage_costs(spec, pp, b))
                lines.append(line)
                print(json.dumps(line), flush=True)
            if pp > 1:
                line = _line("single", pp, b, pp, [single[f"conveyor-{b}"]], spec)
                lines.append(line)
                print(json.dumps(line), flush=True)
    _summary(lines)
    return lines


def _summary(lines: list[dict[str, Any]]) -> None:
    print(f"{'impl':<9}{'pp':>3}{'batch':>6}{'tok/s':>9}{'sim tok/s':>10}{'lat med ms':>11}"
          f"{'p90 ms':>8}{'others':>8}", file=sys.stderr)
    for d in lines:
        sim = d.get("sim_tokens_per_s")
        print(f"{d['impl']:<9}{d['pp']:>3}{d['batch']:>6}{d['tokens_per_s']:>9.1f}"
              f"{'' if sim is None else f'{sim:.1f}':>10}{(d['latency_median_s'] or 0) * 1e3:>11.2f}"
              f"{(d['latency_p90_s'] or 0) * 1e3:>8.2f}{d['others_cpu']:>8.1%}", file=sys.stderr)
    by = {(d["impl"], d["pp"], d["batch"]): d for d in lines}
    batch = max(d["batch"] for d in lines)
    ours, old, single = (by.get((i, 2, batch)) for i in ("conveyor", "old", "single"))
    if ours and old and single:
        verdict = {"summary": f"pp2 batch {batch}",
                   "speedup_vs_old": round(ours["tokens_per_s"] / old["tokens_per_s"], 2),
                   "ratio_vs_single": round(ours["tokens_per_s"] / single["tokens_per_s"], 2)}
        print(json.dumps(verdict), flush=True)
        lines.append(verdict)


if __name__ == "__main__":
    main()
