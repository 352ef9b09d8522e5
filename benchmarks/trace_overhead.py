"""Cost of recording a timeline (``conveyor train --trace``): steps with recording on
and off, alternated in one group so that machine noise hits both alike.

    python benchmarks/trace_overhead.py [--steps 20] [--schedule 1f1b]

Prints one JSON line: median step time with and without recording, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from conveyor.config import ModelConfig, ParallelConfig


def _measure(cfg: ModelConfig, schedule: str, m: int, batch: int, steps: int) -> dict:
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline

    mesh = Mesh.build(2)
    pipe = Pipeline(cfg, ParallelConfig(pp=2, schedule=schedule, microbatches=m), mesh)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    times: dict[bool, list[float]] = {True: [], False: []}
    for step in range(2 * steps + 2):
        record = step % 2 == 1
        pipe.executor.record = record
        dist.barrier()
        t0 = time.perf_counter()
        pipe.train_step(x, y)
        elapsed = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank
        pipe.zero_grad()
        if step >= 2:
            times[record].append(float(elapsed))
    return times


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps with, and as many without")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    from conveyor.runtime.launch import launch

    cfg = ModelConfig()  # the step-time benchmark's model: 8 layers, d_model 256, vocab 8192
    times = launch(_measure, 2, cfg, args.schedule, args.microbatches, args.batch, args.steps)[0]
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(json.dumps({"schedule": args.schedule, "pp": 2, "microbatches": args.microbatches,
                      "steps_each": args.steps, "median_step_s_traced": round(on, 5),
                      "median_step_s_untraced": round(off, 5),
                      "overhead": round(on / off - 1, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
