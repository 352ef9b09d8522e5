"""Does `conveyor plan` rank 2-rank layouts of a small model as they measure on this machine?

Measures a dozen layouts of one model on 2 ranks (pp=2 with each schedule and
microbatch counts from 1, where the bubble is half the step, to 16, where each
microbatch is one sequence; dp=2 with 1, 4 and 8 microbatches; full recomputation
on one pp and one dp layout; tp=2 with and without SP), all built once in one launched
group and timed round-robin (each repetition runs every layout once, starting at a
different one) so that load coming and going hits them alike. A step is timed on
each rank from a barrier to the end of its work; the step time is the slower rank's,
the layout's the median over repetitions. Peak activation memory is the runtime
meter's (``Pipeline.peak_stashed_bytes``) on the fuller rank.

Predictions are the planner's (``plan.simulate_candidate`` with the cpu device) the
way ``conveyor plan --profile`` makes them: gloo's collectives timed and fitted first
(``sim.gloo``, on 2 ranks), then every layout's compute replayed with both ranks at
once (``sim.group_profile``: tp ranks on their shards with their collectives;
pipelines also rank by rank). Those replays run in the measuring processes, a round
of them before each measured round, so that a machine whose load comes and goes
loads profile and measurement alike; and from the FLOP model with the documented
constants alone (``analytic_s``).
Prints one JSON line per layout, then a summary line (also appended to ``--out``):
Spearman rank correlation of predicted and measured step times, the measured best's
place in the predicted order, the worst memory error, the calibration. The machine
must be quiet for timings to mean anything (``others_cpu`` is reported, as in
``sim_accuracy.py``: the share of the cores other processes used meanwhile).

    python benchmarks/plan_accuracy.py --reps 5 --out docs/results/plan_accuracy_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from conveyor.config import ModelConfig
from conveyor.parallel.mesh import Mesh
from conveyor.plan import Candidate, Cluster, simulate_candidate
from conveyor.plan.estimate import costs_from_times, profile_jobs_of
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.runtime.stage import StageRunner
from conveyor.sim.gloo import calibrate
from conveyor.sim.group_profile import GroupReplay, Job
from sim_accuracy import _others, _Usage  # the same load measurement

# Spread so that neighbours differ by more than a quiet machine's noise: microbatch
# counts from 1 (the bubble half the step) to 16, full recomputation (memory for time)
LAYOUTS: list[tuple[int, int, int, str, int, int, bool, str]] = [
    (1, 2, 1, "1f1b", 1, 1, False, "none"), (1, 2, 1, "gpipe", 1, 2, False, "none"),
    (1, 2, 1, "zb-h1", 1, 2, False, "none"), (1, 2, 1, "1f1b", 1, 4, False, "full"),
    (1, 2, 1, "interleaved-1f1b", 2, 4, False, "none"), (1, 2, 1, "zb-v", 2, 4, False, "none"),
    (1, 2, 1, "1f1b", 1, 16, False, "none"),
    (1, 1, 2, "1f1b", 1, 1, False, "none"), (1, 1, 2, "1f1b", 1, 4, False, "full"),
    (1, 1, 2, "1f1b", 1, 8, False, "none"),
    (2, 1, 1, "1f1b", 1, 2, False, "none"), (2, 1, 1, "1f1b", 1, 2, True, "none"),
]
"""(tp, pp, dp, schedule, chunks, microbatches, SP, recompute); the batch splits into dp x m."""


def candidates(batch: int) -> list[Candidate]:
    """The layouts as planner candidates (every sequence of the batch in one step)."""
    out = []
    for tp, pp, dp, name, v, m, sp, rc in LAYOUTS:
        out.append(Candidate(tp=tp, pp=pp, dp=dp, schedule=name, virtual_stages=v,
                             microbatch_size=batch // (dp * m), microbatches=m, recompute=rc,
                             sequence_parallel=sp, partition="uniform"))
    return out


def _worker(model: ModelConfig, cands: list[Candidate], batch: int, reps: int,
            jobs: list[Job]) -> dict[str, Any]:
    torch.set_num_threads(1)
    # the planner's profile of every layout, a round of it before each measured round
    group = GroupReplay(model, jobs, runner=StageRunner) if jobs else None
    meshes: dict[tuple[int, int, int], Mesh] = {}
    pipes = []
    for c in cands:
        key = (c.pp, c.dp, c.tp)
        if key not in meshes:
            meshes[key] = Mesh.build(*key)
        pipes.append(Pipeline(model, c.parallel_config(), meshes[key], seed=0, timeout_s=120))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.vocab_size, (batch, model.max_seq_len + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    times: list[list[float]] = [[] for _ in cands]
    usage = _Usage()
    for rep in range(reps + 1):  # the first repetition warms up
        if group is not None:
            group.round(record=rep > 0)
        for k in range(len(cands)):
            i = (k + rep) % len(cands)
            dist.barrier()
            start = time.perf_counter()
            pipes[i].zero_grad()
            pipes[i].train_step(x, y)
            if rep:
                times[i].append(time.perf_counter() - start)
    return {"times": times, "peak": [p.peak_stashed_bytes() for p in pipes],
            "usage": usage.done(), "profiled": group.finish() if group is not None else []}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (no ties expected among timings)."""
    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos
        return r
    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, predict, compare; print JSON lines and return the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="predict from collectives and compute timed here first (`conveyor "
                    "plan --profile`); --no-profile: the FLOP model and documented constants")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file "
                    "(e.g. docs/results/plan_accuracy_cpu.jsonl)")
    args = ap.parse_args(argv)
    model = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model,
                        n_heads=args.heads, max_seq_len=args.seq)
    cands = candidates(args.batch)
    cluster = Cluster.build("cpu", 2)
    analytic = [simulate_candidate(model, c, cluster, args.seq, args.batch) for c in cands]
    predicted, cal = analytic, None
    jobs = profile_jobs_of(model, cands, args.seq, args.batch) if args.profile else []
    if args.profile:  # what `conveyor plan --profile` does: calibrate, then time every layout
        cal = calibrate(launch=launch)
    started = time.perf_counter()
    got = launch(_worker, 2, model, cands, args.batch, args.reps, jobs, timeout_s=1800)
    if args.profile:
        calibrated = cluster.calibrated(cal)
        times = [{got[r]["profiled"][i][0]: got[r]["profiled"][i][1] for r in got}
                 for i in range(len(jobs))]
        timed = costs_from_times(model, cands, calibrated, args.seq, jobs, times)
        predicted = [simulate_candidate(model, c, calibrated, args.seq, args.batch, cost=k)
                     for c, k in zip(cands, timed, strict=True)]
    # share of the cores other processes used meanwhile (0: a quiet machine)
    others = _others([got[r]["usage"] for r in got])
    measured, rows = [], []
    for i, (c, e) in enumerate(zip(cands, predicted, strict=True)):
        steps = [max(got[r]["times"][i][k] for r in got) for k in range(args.reps)]
        step = statistics.median(steps)
        peak = max(got[r]["peak"][i] for r in got)
        measured.append(step)
        row = {"layout": c.label(), "measured_s": step, "predicted_s": e.step_s,
               "step_error": e.step_s / step - 1, "analytic_s": analytic[i].step_s,
               "measured_peak_act": peak,
               "predicted_peak_act": e.peak_activation_bytes,
               "memory_error": e.peak_activation_bytes / peak - 1}
        rows.append(row)
        print(json.dumps(row))
    order = sorted(range(len(cands)), key=lambda i: predicted[i].step_s)
    best = min(range(len(cands)), key=measured.__getitem__)
    summary = {"spearman": spearman([e.step_s for e in predicted], measured),
               "spearman_analytic": spearman([e.step_s for e in analytic], measured),
               "measured_best": cands[best].label(),
               "measured_best_predicted_place": order.index(best) + 1,
               "worst_memory_error": max(abs(r["memory_error"]) for r in rows),
               "others_cpu": others, "reps": args.reps,
               "seconds": round(time.perf_counter() - started, 1),
               "load_avg": os.getloadavg()[0],
               "collectives": cal.to_dict()["collectives"] if cal else None}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in [*rows, summary])
    return summary


if __name__ == "__main__":
    main()
