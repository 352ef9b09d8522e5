"""Tensor vs pipeline parallelism, and bucketed vs per-parameter data parallelism, as ratios.

    python benchmarks/parallel_3d.py [--steps 8] [--layers 8 --d-model 256 ...]

One launched group of 2 ranks times a training step (forward + backward of the
global batch, no optimizer) of one model, five ways:

  (a) ``single-2t``: the plain ``Transformer`` in one process with 2 threads;
  (b) ``tp2``: Conveyor, tensor parallelism over the 2 ranks (1 thread each), the
      whole batch as one microbatch;
  (c) ``pp2-1f1b``: Conveyor, 2 pipeline stages, 1F1B, ``--microbatches``;
  (d) ``dp2-bucketed``: Conveyor, 2 data-parallel replicas, grads averaged in
      ``--bucket-mb`` buckets issued as a stage's backward ends (the default);
  (e) ``dp2-per-param``: the same with one blocking all-reduce per parameter after
      the step (``dp_bucket_mb=0``).

Cases run round-robin inside each repetition, so load that comes and goes hits them
alike (``_step_workers.run_group``, as ``step_time.py``). One JSON line per case
(``step_time.summarise``'s fields, plus ``tp``, ``dp``, ``dp_collectives_per_step``),
then one line ``"config": "ratios"``: step-time ratios, each as the ratio of medians
and as the median of per-repetition ratios (``_paired``, robust to drifting load);
below 1 the first case is faster. On a shared machine these numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _step_workers import Case, Spec, add_model_args, model_of, run_group  # noqa: E402
from conveyor.config import ConfigError, ModelConfig, ParallelConfig  # noqa: E402
from conveyor.models import Transformer  # noqa: E402
from conveyor.parallel.data import MIB, plan_buckets  # noqa: E402
from conveyor.runtime.launch import launch  # noqa: E402
from step_time import step_ratio, summarise  # noqa: E402

RATIOS = {  # name: (numerator case, denominator case)
    "tp2_vs_single2t": ("tp2", "single-2t"),
    "pp2_vs_single2t": ("pp2-1f1b", "single-2t"),
    "tp2_vs_pp2": ("tp2", "pp2-1f1b"),
    "dp2_bucketed_vs_per_param": ("dp2-bucketed", "dp2-per-param"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--microbatches", type=int, default=8, help="of the pp=2 case")
    p.add_argument("--bucket-mb", type=float, default=ParallelConfig.dp_bucket_mb,
                   help="MiB per data-parallel bucket of the bucketed case")
    p.add_argument("--steps", type=int, default=8, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a wait fails")
    return p.parse_args(argv)


def build_cases(args: argparse.Namespace, model: ModelConfig) -> list[Case]:
    """The five cases, their layouts checked against the model before anything spawns."""
    layouts = {
        "tp2": ParallelConfig(tp=2, microbatches=1),
        "pp2-1f1b": ParallelConfig(pp=2, schedule="1f1b", microbatches=args.microbatches),
        "dp2-bucketed": ParallelConfig(dp=2, microbatches=1, dp_bucket_mb=args.bucket_mb),
        "dp2-per-param": ParallelConfig(dp=2, microbatches=1, dp_bucket_mb=0),
    }
    cases = [Case("single", "none", 1, 2)]
    for label, par in layouts.items():
        try:
            par.check_against(model, args.batch)
        except ConfigError as e:
            raise SystemExit(f"{label}: {e}") from None
        cases.append(Case("conveyor", par.schedule, par.pp, parallel=par, label=label))
    return cases


def dp_collectives(model: ModelConfig, bucket_mb: float) -> int:
    """Grad all-reduces per step of one replica holding the whole model (pp=1)."""
    params = list(Transformer(model, seed=0).parameters())
    if bucket_mb <= 0:
        return len(params)
    return len(plan_buckets(list(reversed(params)), max(1, int(bucket_mb * MIB))))


def ratios(lines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The step-time ratios of ``RATIOS`` (null where a case failed)."""
    out: dict[str, Any] = {"config": "ratios"}
    for name, (a, b) in RATIOS.items():
        out[name], out[f"{name}_paired"] = step_ratio(lines.get(a, {}), lines.get(b, {})) or (
            None, None)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print and return the JSON lines (the cases, then the ratios)."""
    args = parse_args(argv)
    model = model_of(args)
    cases = build_cases(args, model)
    print(f"parallel_3d: {model.n_layers} layers, d_model {model.d_model}, seq {args.seq}, "
          f"batch {args.batch}, {args.warmup}+{args.steps} steps, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    spec = Spec(model=model, batch=args.batch, seq=args.seq, microbatches=args.microbatches,
                steps=args.steps, warmup=args.warmup, seed=args.seed, lr=0.0,
                timeout_s=args.timeout, cases=tuple(cases), label="3d")
    results = launch(run_group, 2, spec, timeout_s=args.timeout, threads_per_rank=1)
    lines: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        line = summarise(case, results, i, spec)
        par = case.parallel
        if par is not None:
            line.update(pp=par.pp, tp=par.tp, dp=par.dp, microbatches=par.microbatches,
                        oversubscribed=False)  # 2 ranks x 1 thread
            if par.dp > 1:
                line["dp_bucket_mb"] = par.dp_bucket_mb
                line["dp_collectives_per_step"] = dp_collectives(model, par.dp_bucket_mb)
        lines.append(line)
    lines.append(ratios({line["config"]: line for line in lines}))
    for line in lines:
        print(json.dumps(line), flush=True)
    summary = {k: v for k, v in lines[-1].items() if k != "config"}
    print(f"ratios (step time, < 1: first is faster): {summary}\n(total "
          f"{time.perf_counter() - t0:.0f}s; load average now {os.getloadavg()[0]:.2f})",
          file=sys.stderr, flush=True)
    return lines


if __name__ == "__main__":
    main()
