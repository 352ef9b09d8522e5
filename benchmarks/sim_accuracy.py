"""How well does the simulator predict a real pipeline step on this machine?

For every registered training schedule at pp=2: take the stages' costs, simulate
the schedule with them, run the real pipeline (2 ranks, one thread each) with
timeline recording, and compare step time, bubble fraction and peak activation
memory per rank. One JSON line per schedule and run on stdout; a table per run and
a summary of all runs on stderr; with --plots DIR, a measured-over-simulated Gantt
chart per schedule (of the last run).

Costs (``--profile``):
  ranks  (default) every rank replays its compute actions on StageRunners of its own
         (``sim.profile.RankReplay``), one replayed step before each measured one,
         all ranks at once: the costs include the ranks sharing the machine, and any
         load that comes and goes hits profile and measurement alike.
  alone  ``sim.profile_costs`` here, before measuring, one rank after another.

With ``--lend`` the pipelines run with ``--lend-cores`` and the simulation divides
each lent action by the k-thread speedup measured first (``CostModel.thread_speedup``).

Measured steps are read on one clock (each rank's timeline shifted by the moment
its executor started) and, since the executor opens a compute action before
waiting for its inputs, a compute action is busy for its span less the receives it
waited on: the waits are bubble, as in the simulation. A schedule's measured step time
and bubble are the medians over ``--steps`` timed steps (after two warm-up steps);
the plots show the step of median length.

Machine load: every JSON line carries ``others_cpu``, the share of all cores that
other processes used while that schedule was profiled and measured (the machine's
busy time from /proc/stat less the ranks' own CPU time), and the 1-minute load
average before and after the run. A number taken while ``others_cpu`` is above a few
percent measures the neighbours, not the simulator. ``--wait-idle S`` makes the ranks
wait (up to S seconds) before each schedule until the machine has been idle for 4 s.

    python benchmarks/sim_accuracy.py [--steps 10] [--runs 3] [--pp4] [--plots docs/img]

``--no-trim`` runs the ranks with glibc's malloc told to keep freed memory (no
trimming of the heap, no mmap for large blocks): the runtime as launched today
returns memory to the OS at times and faults it back in (tens of thousands of page
faults per step on the rank holding the embedding and head), which makes some steps
up to ~10% slower in a way nothing in the schedule predicts. It shows what the
simulator predicts once the runtime does not churn; it is not how ranks are launched.

``--pp4`` adds a pp=4 sample (4 ranks on this 2-core machine, labelled
oversubscribed: reported, not expected to match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.parallel.layout import Layout, resolve_layout
from conveyor.schedules import SCHEDULES, Kind
from conveyor.schedules.validate import Execution, TimedAction, peak_activations

# every registered schedule that trains (forward-only cannot)
DEFAULT_SCHEDULES = [n for n in SCHEDULES if n != "forward-only"]
PP4_SCHEDULES = ["1f1b", "zb-h1"]
_NO_TRIM = {"MALLOC_MMAP_THRESHOLD_": str(2**28), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
_RECVS = (Kind.RECV_F, Kind.RECV_B)


def _wait_idle(limit_s: float) -> float:
    """Wait until the machine's cores have been idle (< 5% busy) for 4 s; seconds waited."""
    t0 = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - t0 < limit_s:
        busy, start = _machine_busy(), time.perf_counter()
        time.sleep(2.0)
        share = (_machine_busy() - busy) / ((os.cpu_count() or 1) * (time.perf_counter() - start))
        quiet = quiet + 1 if share < 0.05 else 0
    return time.perf_counter() - t0


def _measure(cfg: ModelConfig, layouts: dict[str, Layout], batch: int, steps: int,
             profile: bool, wait_idle: float = 0.0, lend: bool = False) -> dict:
    """Per schedule: each timed step's (executor start, timeline), peaks, replay profile."""
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline
    from conveyor.runtime.stage import StageRunner
    from conveyor.sim.profile import RankReplay

    mesh = Mesh.build(next(iter(layouts.values())).pp)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    out: dict[str, Any] = {}
    for name, layout in layouts.items():
        par = ParallelConfig(pp=layout.pp, schedule=name, microbatches=layout.microbatches,
                             lend_cores=lend)
        pipe = Pipeline(cfg, par, mesh, layout=layout)
        replay = None
        if profile:
            assert layout.microbatch_size is not None
            replay = RankReplay(cfg, layout, mesh.pp_rank, microbatch_size=layout.microbatch_size,
                                seq_len=cfg.max_seq_len, runner=StageRunner)
        timed: list[tuple[float, list[TimedAction]]] = []
        waited = _wait_idle(wait_idle) if wait_idle and mesh.rank == 0 else 0.0
        dist.barrier()  # the other ranks wait here, idle
        usage = _Usage()
        for step in range(steps + 2):  # two warm-up steps
            if replay is not None:
                dist.barrier()
                replay.step(record=step >= 2)
            pipe.executor.record = step >= 2
            dist.barrier()
            pipe.train_step(x, y)
            pipe.zero_grad()
            if step >= 2:
                # the executor's clock starts in its run(): perf_counter is one clock for
                # every process of this machine, so the ranks share one time axis
                timed.append((pipe.executor._t0, list(pipe.executor.timeline)))
        dist.barrier()
        out[name] = {"steps": timed, "peak": pipe.peak_stashed_bytes(),
                     "peak_units": pipe.meter.peak_units, "usage": usage.done(),
                     "waited_s": waited,
                     "profile": replay.finish() if replay is not None else None}
        del pipe, replay
    return out


def _machine_busy() -> float:
    """CPU seconds all cores of this machine have been busy (/proc/stat, idle excluded)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class _Usage:
    """What this rank and the whole machine spent while one schedule was measured."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time(), _machine_busy())

    def done(self) -> tuple[float, float, float]:
        """(wall seconds, this process's CPU seconds, the machine's busy CPU seconds)."""
        end = (time.perf_counter(), time.process_time(), _machine_busy())
        return tuple(b - a for a, b in zip(self.start, end, strict=True))  # type: ignore[return-value]


def _others(usages: list[tuple[float, float, float]]) -> float:
    """Share of all cores other processes used: the machine's busy time less the ranks'."""
    wall = max(u[0] for u in usages)
    machine = statistics.median(u[2] for u in usages)  # every rank read the same counter
    ours = sum(u[1] for u in usages)
    return round(max(0.0, machine - ours) / ((os.cpu_count() or 1) * wall), 3)


def measured_execution(per_rank: dict[int, tuple[float, list[TimedAction]]]) -> Execution:
    """One measured step on one clock (0 = the first rank's start), waits as idle.

    The executor notes a compute action from before it waits for its inputs and notes
    each wait as a RECV (inside the compute, so before it in the list); here a compute
    action is busy for its span less those waits, and starts that much later (an
    overlapped pair may wait for its backward's input after its forward).
    """
    origin = min(t0 for t0, _ in per_rank.values())
    timeline: dict[int, list[TimedAction]] = {}
    for rank, (t0, row) in sorted(per_rank.items()):
        shift = t0 - origin
        out = []
        waited = 0.0  # waits noted since the last compute action: inside the next one
        for t in row:
            start, end = t.start + shift, t.end + shift
            if t.action.kind in _RECVS:
                waited += end - start
            elif t.action.kind.is_compute:
                start = min(start + waited, end)
                waited = 0.0
            out.append(TimedAction(rank, t.action, start, end, start))
        timeline[rank] = sorted(out, key=lambda t: (t.start, t.end))
    return Execution(timeline)


def _median_step(steps: list[Execution]) -> Execution:
    """The timed step whose makespan is the median one (the one drawn)."""
    spans = [e.makespan for e in steps]
    return steps[spans.index(statistics.median_low(spans))]


def _profile_alone(cfg: ModelConfig, layout: Layout, seq: int) -> Any:
    from conveyor.runtime.stage import StageRunner
    from conveyor.sim import profile_costs

    assert layout.microbatch_size is not None
    print(f"profiling {layout.schedule_name} here ...", file=sys.stderr)
    return profile_costs(cfg, layout, microbatch_size=layout.microbatch_size, seq_len=seq,
                         runner=StageRunner)


def run_once(cfg: ModelConfig, names: list[str], args: argparse.Namespace, pp: int,
             run: int, dump: dict | None) -> list[dict[str, Any]]:
    """Profile, simulate and measure every schedule once at ``pp``; the JSON rows."""
    from conveyor.runtime.launch import launch
    from conveyor.sim import render_comparison, simulate
    from conveyor.sim.profile import costs_from_profiles

    layouts = {n: resolve_layout(cfg, ParallelConfig(pp=pp, schedule=n,
                                                     microbatches=args.microbatches),
                                 batch_size=args.batch) for n in names}
    in_ranks = args.profile == "ranks"
    cost_of = {} if in_ranks else {n: _profile_alone(cfg, layouts[n], args.seq) for n in names}
    speedup: tuple[float, ...] = ()
    if args.lend:  # measured here before the ranks start, as `conveyor simulate --lend-cores`
        from conveyor.sim.block_profile import thread_speedups

        mbs = args.batch // args.microbatches
        speedup = thread_speedups(cfg, microbatch_size=mbs, seq_len=args.seq, max_threads=pp)
    load_before = os.getloadavg()[0]
    print(f"measuring pp={pp}{', profiling in the ranks' if in_ranks else ''} ...",
          file=sys.stderr)
    measured = launch(_measure, pp, cfg, layouts, args.batch, args.steps, in_ranks,
                      args.wait_idle, args.lend, timeout_s=max(300.0, args.wait_idle + 300.0))
    load_after = os.getloadavg()[0]
    oversubscribed = pp > (os.cpu_count() or 1)
    rows = []
    for name in names:
        layout = layouts[name]
        if in_ranks:
            assert layout.microbatch_size is not None
            cost_of[name] = costs_from_profiles(
                cfg, layout.partition, [measured[r][name]["profile"] for r in sorted(measured)],
                microbatch_size=layout.microbatch_size, seq_len=args.seq,
                source=f"StageRunner replayed in the ranks, median over {args.steps} steps")
        sim = simulate(layout.schedule, dataclasses.replace(cost_of[name], thread_speedup=speedup))
        steps = [measured_execution({r: measured[r][name]["steps"][i] for r in measured})
                 for i in range(args.steps)]
        real = _median_step(steps)
        # medians over the timed steps, each on its own (one step's bubble can be odd)
        step_s = statistics.median(e.makespan for e in steps)
        bubble = statistics.median(e.bubble_fraction() for e in steps)
        peaks = {r: measured[r][name]["peak"] for r in sorted(measured)}
        row = {
            "schedule": name,
            "pp": pp,
            "microbatches": args.microbatches,
            "run": run,
            "lend_cores": args.lend,
            "measured_step_s": round(step_s, 5),
            "simulated_step_s": round(sim.step_time, 5),
            "step_error": round(sim.step_time / step_s - 1, 4),
            "measured_bubble": round(bubble, 4),
            "simulated_bubble": round(sim.bubble_fraction, 4),
            "bubble_error_pp": round(100 * (sim.bubble_fraction - bubble), 2),
            "measured_peak_act_bytes": peaks,
            "simulated_peak_act_bytes": sim.peak_activation_bytes,
            "memory_error": {
                r: round(sim.peak_activation_bytes[r] / peaks[r] - 1, 4) for r in peaks
            },
            # the same peaks in stage-microbatches (validate.peak_activations' unit)
            "measured_peak_units": {r: measured[r][name]["peak_units"] for r in sorted(measured)},
            "simulated_peak_units": peak_activations(sim.schedule, lambda stage: 1),
            "profile": args.profile,
            "oversubscribed": oversubscribed,
            "load_average": [round(load_before, 2), round(load_after, 2)],
            "others_cpu": _others([measured[r][name]["usage"] for r in measured]),
            "malloc_no_trim": args.no_trim,
            "waited_for_idle_s": round(measured[0][name]["waited_s"], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if dump is not None:
            dump.setdefault(f"pp{pp}", []).append({
                "run": run, "schedule": name, "cost": cost_of[name].to_dict(),
                "steps": [{r: [[str(t.action), t.start, t.end] for t in e.timeline[r]]
                           for r in e.timeline} for e in steps],
                "simulated": {r: [[str(t.action), t.start, t.end] for t in row]
                              for r, row in sim.timeline.items()},
                "profile_times": {f"{s}{k}": v for r in sorted(measured)
                                  if measured[r][name]["profile"] is not None
                                  for (s, k), v in measured[r][name]["profile"].times.items()},
            })
        if args.plots:
            path = Path(args.plots) / f"trace_{name}_pp{pp}.png"
            render_comparison(real.timeline, sim.timeline, path,
                              title=f"{name}, pp={pp}, m={args.microbatches}")
    print(_table(rows, f"run {run}, pp={pp}" + (" (oversubscribed)" if oversubscribed else "")
                 + f"; load average {load_before:.2f} -> {load_after:.2f}"), file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"\n{title}",
             f"{'schedule':<18}{'meas ms':>9}{'sim ms':>9}{'err':>7}{'meas bub':>10}"
             f"{'sim bub':>9}{'bub err':>9}{'mem err':>9}{'others':>8}"]
    for r in rows:
        mem = max(abs(v) for v in r["memory_error"].values())
        lines.append(f"{r['schedule']:<18}{r['measured_step_s'] * 1e3:>9.1f}"
                     f"{r['simulated_step_s'] * 1e3:>9.1f}{r['step_error']:>7.1%}"
                     f"{r['measured_bubble']:>10.1%}{r['simulated_bubble']:>9.1%}"
                     f"{r['bubble_error_pp']:>8.1f}p{mem:>9.1%}{r['others_cpu']:>8.1%}")
    return "\n".join(lines)


def _summary(rows: list[dict[str, Any]]) -> str:
    """Worst errors over the runs, per (pp, schedule)."""
    lines = ["\nall runs: worst error per schedule (signed)",
             f"{'schedule':<18}{'pp':>3}{'runs':>5}{'step err':>10}{'bub err':>9}{'mem err':>9}"]
    for pp, name in dict.fromkeys((r["pp"], r["schedule"]) for r in rows):
        mine = [r for r in rows if (r["pp"], r["schedule"]) == (pp, name)]
        step = max(mine, key=lambda r: abs(r["step_error"]))["step_error"]
        bub = max(mine, key=lambda r: abs(r["bubble_error_pp"]))["bubble_error_pp"]
        mem = max(abs(v) for r in mine for v in r["memory_error"].values())
        note = "  (oversubscribed)" if mine[0]["oversubscribed"] else ""
        lines.append(f"{name:<18}{pp:>3}{len(mine):>5}{step:>10.1%}{bub:>8.1f}p{mem:>9.1%}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print one JSON line per schedule and run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--runs", type=int, default=1, help="repeat everything this often")
    p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES))
    p.add_argument("--profile", choices=["ranks", "alone"], default="ranks",
                   help="where the costs are taken (see above)")
    p.add_argument("--pp4", action="store_true",
                   help=f"also pp=4 ({', '.join(PP4_SCHEDULES)}; oversubscribed on 2 cores)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each schedule wait up to S seconds for an idle machine")
    p.add_argument("--no-trim", action="store_true",
                   help="ranks keep freed memory (glibc: no heap trimming, no mmap); see above")
    p.add_argument("--lend", action="store_true",
                   help="run and simulate with --lend-cores (the k-thread speedup measured first)")
    p.add_argument("--plots", default=None, help="write measured-vs-simulated PNGs here")
    p.add_argument("--dump", default=None, help="write raw timelines and costs (JSON) here")
    args = p.parse_args(argv)

    cfg = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model,
                      n_heads=args.heads, max_seq_len=args.seq)
    names = args.schedules.split(",")
    if args.no_trim:  # read by glibc when each spawned rank starts
        os.environ.update(_NO_TRIM)
    print(f"sim_accuracy: {cfg.n_layers} layers, d_model {cfg.d_model}, seq {args.seq}, "
          f"batch {args.batch}, {args.microbatches} microbatches, 2+{args.steps} steps, "
          f"{args.runs} run(s), profile {args.profile}{', no trim' * args.no_trim}, "
          f"{os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    dump: dict | None = {} if args.dump else None
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        rows += run_once(cfg, names, args, 2, run, dump)
        if args.pp4:
            rows += run_once(cfg, PP4_SCHEDULES, args, 4, run, dump)
    if args.runs > 1:
        print(_summary(rows), file=sys.stderr)
    print(f"(total {time.perf_counter() - t0:.0f}s; load average now "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    if dump is not None:
        Path(args.dump).write_text(json.dumps(dump))
    return 0


if __name__ == "__main__":
    sys.exit(main())
