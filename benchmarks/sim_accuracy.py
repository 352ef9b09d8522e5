"""How well does the simulator predict a real pipeline step on this machine?

For every schedule at pp=2: profile the model's stages in one process (one
thread), simulate the schedule with those costs, then run the real pipeline
(2 ranks, one thread each) with timeline recording and compare step time, bubble
fraction and peak activation memory per rank. One JSON line per schedule on
stdout; with --plots DIR, a measured-over-simulated Gantt chart per schedule.

    python benchmarks/sim_accuracy.py [--steps 6] [--plots docs/img]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.parallel.layout import resolve_layout
from conveyor.schedules.validate import Execution, TimedAction

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v"]


def _measure(cfg: ModelConfig, schedules: list[str], batch: int, m: int, steps: int) -> dict:
    """Per rank: for each schedule, the timelines of the timed steps and peak stashed bytes."""
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline

    mesh = Mesh.build(2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    out: dict[str, Any] = {}
    for name in schedules:
        pipe = Pipeline(cfg, ParallelConfig(pp=2, schedule=name, microbatches=m), mesh)
        timelines: list[list[TimedAction]] = []
        for step in range(steps + 2):  # two warm-up steps
            pipe.executor.record = step >= 2
            dist.barrier()
            pipe.train_step(x, y)
            pipe.zero_grad()
            if step >= 2:
                timelines.append(list(pipe.executor.timeline))
        out[name] = {"timelines": timelines, "peak": pipe.peak_stashed_bytes()}
    return out


def _median_step(per_rank: dict[int, list[list[TimedAction]]]) -> dict[int, list[TimedAction]]:
    """The timed step whose makespan is the median one, all ranks together."""
    steps = len(next(iter(per_rank.values())))
    spans = [max(t.end for r in per_rank for t in per_rank[r][i]) for i in range(steps)]
    i = spans.index(statistics.median_low(spans))
    return {r: per_rank[r][i] for r in sorted(per_rank)}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print one JSON line per schedule."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--plots", default=None, help="write measured-vs-simulated PNGs here")
    args = p.parse_args(argv)

    from conveyor.runtime.launch import launch
    from conveyor.sim import profile_costs, render_comparison, simulate

    cfg = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model,
                      n_heads=args.heads, max_seq_len=args.seq)
    names = args.schedules.split(",")
    layouts = {n: resolve_layout(cfg, ParallelConfig(pp=2, schedule=n,
                                                     microbatches=args.microbatches),
                                 batch_size=args.batch) for n in names}
    costs = {}
    for layout in layouts.values():
        if layout.partition not in costs:
            print(f"profiling {layout.num_stages} stages {layout.partition} ...", file=sys.stderr)
            costs[layout.partition] = profile_costs(
                cfg, layout.partition, microbatch_size=layout.microbatch_size, seq_len=args.seq)
    print("measuring ...", file=sys.stderr)
    measured = launch(_measure, 2, cfg, names, args.batch, args.microbatches, args.steps)
    rows = []
    for name in names:
        sched = layouts[name].schedule
        sim = simulate(sched, costs[layouts[name].partition])
        real = Execution(_median_step({r: measured[r][name]["timelines"] for r in measured}))
        peaks = {r: measured[r][name]["peak"] for r in sorted(measured)}
        row = {
            "schedule": name,
            "pp": 2,
            "microbatches": args.microbatches,
            "measured_step_s": round(real.makespan, 5),
            "simulated_step_s": round(sim.step_time, 5),
            "step_error": round(sim.step_time / real.makespan - 1, 4),
            "measured_bubble": round(real.bubble_fraction(), 4),
            "simulated_bubble": round(sim.bubble_fraction, 4),
            "bubble_error_pp": round(100 * (sim.bubble_fraction - real.bubble_fraction()), 2),
            "measured_peak_act_bytes": peaks,
            "simulated_peak_act_bytes": sim.peak_activation_bytes,
            "memory_error": {
                r: round(sim.peak_activation_bytes[r] / peaks[r] - 1, 4) for r in peaks
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.plots:
            path = Path(args.plots) / f"trace_{name}_pp2.png"
            render_comparison(real.timeline, sim.timeline, path,
                              title=f"{name}, pp=2, m={args.microbatches}")
    print(f"\n{'schedule':<18}{'meas ms':>9}{'sim ms':>9}{'err':>7}{'meas bub':>10}"
          f"{'sim bub':>9}{'mem err':>9}", file=sys.stderr)
    for r in rows:
        mem = max(abs(v) for v in r["memory_error"].values())
        print(f"{r['schedule']:<18}{r['measured_step_s'] * 1e3:>9.1f}"
              f"{r['simulated_step_s'] * 1e3:>9.1f}{r['step_error']:>7.1%}"
              f"{r['measured_bubble']:>10.1%}{r['simulated_bubble']:>9.1%}{mem:>9.1%}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
