"""Step time of Conveyor's pipeline schedules beside torch.distributed.pipelining.

    python benchmarks/step_time.py [--steps 10] [--pp4] [--isolate] ...

One JSON line per configuration on stdout, progress and a summary table on stderr:

  (a) single process, 1 thread, and (b) single process, 2 threads: the plain
      ``Transformer``, forward + backward of the whole global batch;
  (c) Conveyor, pp=2 (2 ranks, 1 thread each), every schedule asked for, twice:
      ``conveyor-default`` (what ``conveyor train`` runs: the cost-balanced partition)
      and ``conveyor-uniform`` (equal layer counts);
  (d) torch.distributed.pipelining's counterpart of each, on the same blocks, same
      microbatches, same data, same init, split the way a user writes by hand
      (``torch``: the uniform split) and, for a like-for-like comparison, on
      Conveyor's balanced split (``torch-balanced``; ``--no-torch-balanced`` skips it);
  (e) with ``--pp4``: pp=4 on 4 ranks (oversubscribed on a 2-core machine);
  (f) with ``--lend``: ``conveyor-lend``, the default line with ``--lend-cores`` (idle
      ranks' cores lent to the warm-up and cool-down actions that run alone), with
      ``vs_default`` beside the other ratios.

All of (a)-(d) run in one launched group of 2 ranks (single-process cases on rank 0
while rank 1 sleeps in a barrier), repetitions round-robin over the cases, so
background load hits every case alike. Each case warms up, then times ``--steps``
steps, each after a barrier; the step time is the max over ranks, the reported
time the median over steps. See ``_step_workers.py`` for how compute time (bubble),
loss scaling and memory are measured.

Fields: median_step_s, tokens_per_s (global_batch*seq/median), bubble (mean over
ranks and steps of 1 - compute/step time; null for single process), peak_stash_bytes
(max over ranks of the activation bytes held for backward at once), max_rss_bytes (max
over ranks of the process's peak RSS during this case's steps), vs_torch (our median /
torch's on the uniform split; lower is better), vs_torch_same_split (over torch on the
same split as ours), vs_uniform (default over our uniform line), vs_single_2t (over the
2-thread single process), partition and stage_blocks (the split each line ran),
us_per_action (step time over the busiest rank's actions, communication included: with
a tiny model, ``--layers 1 --d-model 16 --seq 4``, it is the runtime's own overhead), speedup_vs_1thread (tokens/s / single-1t
tokens/s), oversubscribed (ranks*threads > cores). Extras: loss (the step's loss, equal
across implementations up to float rounding: same model, data and init), step_s_all
(step time of every repetition), vs_torch_paired (median over repetitions of our time /
torch's in the same repetition: robust to load that drifts over the run),
page_faults_per_step (minor page faults per rank, median over steps:
the host-memory reuse a timing cannot show on a busy machine), torch_schedule and same_action_order (torch runs every rank's F/B/W in our order; null
where torch keeps no list), cpu_s_per_rank and compute_s_per_rank (medians; on a busy
machine CPU seconds compare the work done better than wall time), cpu_per_wall.

torch counterparts: gpipe -> ScheduleGPipe, 1f1b -> Schedule1F1B, interleaved-1f1b ->
ScheduleInterleaved1F1B (2 stages per rank, looped placement, as ours), zb-h1 ->
ScheduleInterleavedZeroBubble with ONE stage per rank (its ZB1P builder with one local
stage yields exactly ZB-H1: rank r runs pp-r warmup forwards, then F/I/W with W
deferred by r microbatches; same_action_order checks the orders are identical), zb-v
-> ScheduleZBVZeroBubble (V placement: rank r holds stages r and 2*pp-1-r, as ours),
dualpipev -> ScheduleDualPipeV (the same V placement and action order; both run an
overlapped pair's halves one after the other on CPU). zb-h2, v-half and v-min have no
torch counterpart (vs_torch null).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _step_workers import (  # noqa: E402
    TORCH_COUNTERPART,
    Case,
    Spec,
    add_model_args,
    model_of,
    run_group,
)
from conveyor.config import ConfigError, ModelConfig, ParallelConfig  # noqa: E402
from conveyor.parallel.layout import resolve_layout  # noqa: E402
from conveyor.runtime.launch import launch  # noqa: E402
from conveyor.schedules.lower import lower  # noqa: E402

ALL_SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipev",
                 "v-half", "v-min"]
PP4_SCHEDULES = ["1f1b", "interleaved-1f1b", "zb-h1"]
FIELDS = [
    "config", "schedule", "impl", "pp", "microbatches", "threads_per_rank", "median_step_s",
    "tokens_per_s", "bubble", "peak_stash_bytes", "max_rss_bytes", "vs_torch",
    "speedup_vs_1thread", "oversubscribed", "partition", "stage_blocks",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    m = p.add_argument_group("model and batch")
    add_model_args(m)
    m.add_argument("--microbatches", type=int, default=8)
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=int, default=8,
                   help="timed steps per configuration (8 keeps the default run under 5 min "
                   "on a busy 2-core machine; use 10 or more on a quiet one)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    r.add_argument("--schedules", default=",".join(ALL_SCHEDULES),
                   help="comma-separated Conveyor schedules for pp=2")
    r.add_argument("--pp4", action="store_true",
                   help=f"also pp=4 on 4 ranks for {', '.join(PP4_SCHEDULES)} (oversubscribed)")
    r.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    r.add_argument("--no-torch-balanced", action="store_true",
                   help="skip torch on Conveyor's balanced split (keep torch on the uniform one)")
    r.add_argument("--no-single", action="store_true", help="skip the single-process cases")
    r.add_argument("--lend", action="store_true",
                   help="also Conveyor's default with --lend-cores (conveyor-lend lines, with "
                   "vs_default): idle ranks' cores lent at warm-up and cool-down")
    r.add_argument("--isolate", action="store_true",
                   help="every case in its own processes (clean per-case RSS, no interleaving)")
    r.add_argument("--sgd", type=float, default=0.0, metavar="LR",
                   help="take an SGD step of this learning rate inside each step (0: none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=300.0, help="seconds before a wait fails")
    return p.parse_args(argv)


def _cases(args: argparse.Namespace, pp: int, schedules: list[str]) -> list[Case]:
    cases = []
    for s in schedules:
        cases += [Case("conveyor", s, pp, partition="cost"), Case("conveyor", s, pp)]
        if args.lend:
            par = ParallelConfig(pp=pp, schedule=s, microbatches=args.microbatches, lend_cores=True)
            cases.append(Case("conveyor", s, pp, partition="cost", parallel=par,
                              label=f"pp{pp}-{s}-conveyor-lend"))
        cls = TORCH_COUNTERPART[s]
        if cls is not None and not args.no_torch:
            cases.append(Case("torch", s, pp, torch_class=cls))
            if not args.no_torch_balanced:
                cases.append(Case("torch", s, pp, torch_class=cls, partition="cost"))
    return cases


def step_ratio(line: dict[str, Any], peer: dict[str, Any]) -> tuple[float, float] | None:
    """(median step time over the peer's, median of the per-repetition ratios); None if one failed.

    The two ran back to back in each repetition: the median of the per-repetition
    ratios cancels load that drifts between repetitions.
    """
    if "median_step_s" not in line or "median_step_s" not in peer:
        return None
    pairs = zip(line["step_s_all"], peer["step_s_all"], strict=False)
    return (round(line["median_step_s"] / peer["median_step_s"], 3),
            round(statistics.median(a / b for a, b in pairs), 3))


def _peers(name: str) -> dict[str, str]:
    """Ratio field -> the config a Conveyor line is compared with (lower is better)."""
    if name.endswith("-conveyor-default"):
        base = name.removesuffix("-conveyor-default")
        return {"vs_torch": f"{base}-torch", "vs_torch_same_split": f"{base}-torch-balanced",
                "vs_uniform": f"{base}-conveyor-uniform", "vs_single_2t": "single-2t"}
    if name.endswith("-conveyor-lend"):
        base = name.removesuffix("-conveyor-lend")
        return {"vs_torch": f"{base}-torch", "vs_torch_same_split": f"{base}-torch-balanced",
                "vs_default": f"{base}-conveyor-default", "vs_single_2t": "single-2t"}
    if name.endswith("-conveyor-uniform"):
        base = name.removesuffix("-conveyor-uniform")
        return {"vs_torch": f"{base}-torch", "vs_torch_same_split": f"{base}-torch",
                "vs_single_2t": "single-2t"}
    return {}


def build_groups(args: argparse.Namespace, model: ModelConfig) -> list[tuple[int, list[Case]]]:
    """(world size, cases) of every launched group, validated before anything spawns."""
    schedules = [s for s in args.schedules.split(",") if s]
    for s in schedules:
        if s not in TORCH_COUNTERPART:
            raise SystemExit(f"--schedules: {s!r} is unknown; choose from {', '.join(ALL_SCHEDULES)}")
    single = [] if args.no_single else [Case("single", "none", 1, 1), Case("single", "none", 1, 2)]
    groups: list[tuple[int, list[Case]]] = [(2, single + _cases(args, 2, schedules))]
    if args.pp4:
        groups.append((4, _cases(args, 4, [s for s in PP4_SCHEDULES if s in schedules] or PP4_SCHEDULES)))
    for _, cases in groups:
        for c in cases:
            if c.impl == "single":
                continue
            try:
                ParallelConfig(pp=c.pp, schedule=c.schedule, microbatches=args.microbatches
                               ).check_against(model, args.batch)
            except ConfigError as e:
                raise SystemExit(f"{c.name}: {e}") from None
    if args.isolate:
        return [(1 if c.impl == "single" else c.pp, [c]) for _, cases in groups for c in cases]
    return [g for g in groups if g[1]]


def summarise(case: Case, results: dict[int, Any], index: int, spec: Spec) -> dict[str, Any]:
    """One JSON line for ``case`` from every rank's records."""
    line: dict[str, Any] = {
        "config": case.name, "schedule": case.schedule, "impl": case.impl, "pp": case.pp,
        "microbatches": spec.microbatches if case.impl != "single" else 1,
        "threads_per_rank": case.threads,
    }
    if case.impl != "single":
        line["partition"] = case.partition
        layout = resolve_layout(spec.model, case.parallel_config(spec.microbatches))
        line["stage_blocks"] = [list(b) for b in layout.partition.bounds]
        # with a tiny model the step is nearly all runtime overhead: per action it
        # compares the two runtimes' cost of stepping through the same list
        lowered = lower(layout.schedule)
        line["actions_per_rank"] = max(len(a) for a in lowered.actions.values())
    if case.impl == "torch":
        line["torch_schedule"] = case.torch_class
        same = [res["same_order"][index] for res in results.values()]
        # does torch run every rank's F/B/W in Conveyor's order? (null: it keeps no list)
        line["same_action_order"] = None if None in same else all(same)
    errors = {r: res["errors"][index] for r, res in results.items() if res["errors"][index]}
    per_rank = {r: res["records"][index] for r, res in results.items() if res["records"][index]}
    if errors or not per_rank:
        line["error"] = next(iter(errors.values()), "no timed steps")
        return line
    reps = sorted({rec["rep"] for recs in per_rank.values() for rec in recs})
    step = {rep: max(rec["step_s"] for recs in per_rank.values() for rec in recs
                     if rec["rep"] == rep) for rep in reps}
    median = statistics.median(step.values())
    line["median_step_s"] = round(median, 5)
    line["tokens_per_s"] = round(spec.batch * spec.seq / median, 1)
    if "actions_per_rank" in line:
        line["us_per_action"] = round(median / line["actions_per_rank"] * 1e6, 1)
    line["step_s_min_max"] = [round(min(step.values()), 5), round(max(step.values()), 5)]
    line["step_s_all"] = [round(step[rep], 5) for rep in reps]  # by repetition, for pairing
    if case.impl == "single":
        line["bubble"] = None
    else:
        fracs = [1 - rec["compute_s"] / step[rec["rep"]] for recs in per_rank.values() for rec in recs]
        line["bubble"] = round(statistics.fmean(fracs), 4)
    stash = [res["stash"][index] for res in results.values() if res["stash"][index] is not None]
    line["peak_stash_bytes"] = max(stash) if stash else None
    line["peak_stash_bytes_per_rank"] = [results[r]["stash"][index] for r in sorted(results)] if stash else None
    rss = {r: max(rec["rss"] for rec in recs) for r, recs in per_rank.items()}
    line["max_rss_bytes"] = max(rss.values())
    line["max_rss_bytes_per_rank"] = [rss[r] for r in sorted(rss)]
    line["rss_peak_reset"] = all(res["rss_reset"] for res in results.values())
    cpu = [rec["cpu_s"] / rec["step_s"] for recs in per_rank.values() for rec in recs]
    line["cpu_per_wall"] = round(statistics.fmean(cpu), 3)
    # diagnostics, medians over steps per rank: process CPU seconds and compute seconds
    line["cpu_s_per_rank"] = [round(statistics.median(r["cpu_s"] for r in per_rank[k]), 4)
                              for k in sorted(per_rank)]
    line["page_faults_per_step"] = [int(statistics.median(r["faults"] for r in per_rank[k]))
                                    for k in sorted(per_rank)]
    if case.impl != "single":
        line["compute_s_per_rank"] = [
            round(statistics.median(r["compute_s"] for r in per_rank[k]), 4) for k in sorted(per_rank)]
    losses = [res["losses"][index] for res in results.values() if res["losses"][index] is not None]
    line["loss"] = round(losses[0], 6) if losses else None
    world = 1 if case.impl == "single" else case.pp
    line["oversubscribed"] = world * case.threads > (os.cpu_count() or 1)
    return line


def _table(lines: list[dict[str, Any]]) -> str:
    cols = [("config", 40, "s"), ("median_step_s", 9, ".4f"), ("tokens_per_s", 9, ".0f"),
            ("bubble", 7, ".3f"), ("vs_torch", 8, ".3f"), ("vs_single_2t", 8, ".3f"),
            ("speedup_vs_1thread", 8, ".2f"),
            ("peak_stash_bytes", 11, ".0f"), ("max_rss_bytes", 11, ".0f")]
    head = ["config", "step_s", "tok/s", "bubble", "vs_torch", "vs_2thr", "x1thr", "stash_MB",
            "rss_MB"]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, (_, w, _)) in enumerate(zip(head, cols, strict=True)))]
    for line in lines:
        cells = []
        for name, width, fmt in cols:
            v = line.get(name)
            if name in ("peak_stash_bytes", "max_rss_bytes") and v is not None:
                v = v / 2**20
                fmt = ".1f"
            if name == "config":
                text = str(v) + (" (oversub)" if line.get("oversubscribed") else "")
                cells.append(text.ljust(width))
            elif "error" in line and name == "median_step_s":
                cells.append(("error: " + line["error"])[:60])
                break
            else:
                cells.append(("-" if v is None else format(v, fmt)).rjust(width))
        out.append("  ".join(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print and return the JSON lines."""
    args = parse_args(argv)
    model = model_of(args)
    groups = build_groups(args, model)
    print(f"step_time: {model.n_layers} layers, d_model {model.d_model}, seq {args.seq}, "
          f"batch {args.batch}, {args.microbatches} microbatches, {args.warmup}+{args.steps} "
          f"steps, {len(groups)} group(s), {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    lines: list[dict[str, Any]] = []
    for world, cases in groups:
        label = f"pp{world}" if len(cases) > 1 else cases[0].name
        spec = Spec(model=model, batch=args.batch, seq=args.seq, microbatches=args.microbatches,
                    steps=args.steps, warmup=args.warmup, seed=args.seed, lr=args.sgd,
                    timeout_s=args.timeout, cases=tuple(cases), label=label)
        results = launch(run_group, world, spec, timeout_s=args.timeout, threads_per_rank=1)
        lines += [summarise(c, results, i, spec) for i, c in enumerate(cases)]

    by_name = {line["config"]: line for line in lines}
    base = by_name.get("single-1t", {}).get("tokens_per_s")
    for line in lines:
        line.setdefault("vs_torch", None)
        for field, name in _peers(line["config"]).items():
            ratio = step_ratio(line, by_name.get(name, {}))
            if ratio is not None:
                line[field], line[field + "_paired"] = ratio
        tps = line.get("tokens_per_s")
        line["speedup_vs_1thread"] = round(tps / base, 3) if tps and base else None
        for f in FIELDS:
            line.setdefault(f, None)
        print(json.dumps(line), flush=True)
    print(f"\n{_table(lines)}\n(total {time.perf_counter() - t0:.0f}s; load average now "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return lines


if __name__ == "__main__":
    main()
