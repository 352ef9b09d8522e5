"""Memory per rank of 1F1B at pp=2 as the number of microbatches m grows: flat, not linear.

    python benchmarks/boundary_memory.py [--microbatches 4,8,16,32] [--nccl-semantics | --plain]

Every m runs with the SAME microbatch size (``--mb-size`` sequences), so the global
batch grows with m. Each (mode, m) runs in a FRESH spawned group of 2 ranks (one
``launch`` each), so every process's peak RSS belongs to that m alone. Modes: plain
gloo transfers, then the same under the NCCL-semantics emulation on gloo
(``Pipeline(emulate_nccl=True)``: one work per batch, rendezvous sends); both by
default, one with ``--plain`` or ``--nccl-semantics``.

In each rank: build the pipeline, run ``--warmup`` steps, reset the peak RSS
(``/proc/self/clear_refs``), then time ``--steps`` steps (each after a barrier; a
step's time is the max over ranks, the reported time the median over steps).

One JSON line per (mode, m, rank) on stdout; progress and a table on stderr. Fields:

  - ``peak_activation_bytes``: ``Pipeline.peak_activation_bytes()``, the most bytes the
    rank held at once in stashed activations (kind ``stash``) plus boundary tensors
    posted and not yet delivered (kind ``send``); ``peak_stashed_bytes`` the stash
    alone, ``peak_send_bytes`` the sends alone. Counted by the runtime's meter.
  - ``held_until_step_end_bytes``: what the OLD runtime held in sends: every boundary
    tensor this rank sends in a step (m x ``bytes_per_boundary``), kept until the
    step's end. Linear in m, for contrast.
  - ``peak_rss_mib``: ``ru_maxrss`` of the rank's process over its whole (fresh) life;
    ``peak_rss_steps_mib`` the peak during the timed steps alone (null if the kernel
    refuses the reset); ``rss_built_mib`` and ``rss_warm_mib`` the current RSS after
    building the pipeline and after the warm-up steps.
  - ``rss_growth_mib`` = peak during the timed steps - RSS after warm-up: what a step
    adds on top of what stays resident; ``rss_growth_from_built_mib`` = lifetime peak -
    RSS after building: everything training added, first-step allocations included.
    These are the parts that could depend on m (imports and weights do not).
  - ``median_step_s`` (and ``step_s_all``), ``tokens_per_s``, ``loss``; ``attempts``: how
    many launches the group took (a group whose rank dies is relaunched ``--retries``
    times; one that never succeeds gives a line with ``error`` instead).

How to read it: down each (mode, rank) block of the table (all MiB), ``held(old)``
doubles with m. If the runtime lets completed sends go during the step, ``send`` stays
at a few boundary tensors and ``counted`` and the RSS columns stay (nearly) constant; a
``send`` column equal to ``held(old)`` means sends were held to the step's end after
all. The summary under the table gives, per mode and rank, max/min over m of each
column (1.00 = flat; ``held(old)`` gives max m / min m).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _step_workers import peak_rss_bytes, reset_peak_rss  # noqa: E402
from conveyor.config import ConfigError, ModelConfig, ParallelConfig  # noqa: E402

MIB = 2**20
MODES = {"gloo": False, "nccl-semantics": True}


@dataclass(frozen=True)
class Spec:
    """Everything one launched group needs (picklable)."""

    model: ModelConfig
    microbatches: int
    mb_size: int
    seq: int
    steps: int
    warmup: int
    seed: int
    emulate_nccl: bool
    timeout_s: float


# -- memory helpers -------------------------------------------------------------------


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (VmRSS), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mib(nbytes: int | None) -> float | None:
    """Bytes as MiB rounded to 0.1, None kept."""
    return None if nbytes is None else round(nbytes / MIB, 1)


# -- rank side ------------------------------------------------------------------------


def _sent_bytes_per_step(pipe: Any) -> tuple[int, int]:
    """(boundary tensors this rank sends per step, bytes of one): from the lowered actions."""
    from conveyor.schedules import Kind

    sizes = []
    for a in pipe.executor.actions:
        if a.kind not in (Kind.SEND_F, Kind.SEND_B):
            continue
        boundary = a.stage if a.kind is Kind.SEND_F else a.stage - 1
        sig = pipe.p2p.signature(boundary)
        sizes.append(sum(s.nbytes for s in sig.values() if a.kind is Kind.SEND_F or s.grad))
    return len(sizes), (max(sizes) if sizes else 0)


def measure(spec: Spec) -> dict[str, Any]:
    """One rank: warm up, time ``spec.steps`` 1F1B steps, return memory and time figures."""
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline

    mesh = Mesh.build(2)
    par = ParallelConfig(pp=2, schedule="1f1b", microbatches=spec.microbatches)
    pipe = Pipeline(spec.model, par, mesh, seed=spec.seed, timeout_s=spec.timeout_s,
                    emulate_nccl=spec.emulate_nccl)
    batch = spec.microbatches * spec.mb_size
    tokens = torch.randint(0, spec.model.vocab_size, (batch, spec.seq + 1),
                           generator=torch.Generator().manual_seed(spec.seed))
    x, y = tokens[:, :-1], tokens[:, 1:]
    rss_built = current_rss_bytes()
    for _ in range(spec.warmup):
        pipe.train_step(x, y)
        pipe.zero_grad()
    rss_warm = current_rss_bytes()
    peak_life = peak_rss_bytes()  # through the warm-up; the reset below would lose it
    reset_ok = reset_peak_rss()
    times, loss = [], float("nan")
    for _ in range(spec.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = pipe.train_step(x, y)
        elapsed = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank
        pipe.zero_grad()
        times.append(float(elapsed))
    peak_steps = peak_rss_bytes()
    n_sends, per_send = _sent_bytes_per_step(pipe)
    out = {
        "peak_activation_bytes": pipe.peak_activation_bytes(),
        "peak_stashed_bytes": pipe.peak_stashed_bytes(),
        "peak_send_bytes": pipe.meter.peak_by.get("send", 0),
        "sends_per_step": n_sends,
        "bytes_per_boundary": per_send,
        "held_until_step_end_bytes": n_sends * per_send,
        "rss_built": rss_built,
        "rss_warm": rss_warm,
        "peak_rss": max(peak_life, peak_steps),
        "peak_rss_steps": peak_steps if reset_ok else None,
        "step_s": times,
        "loss": loss,
    }
    # Tear the pipeline down while the interpreter is fully alive: a rank has been seen to
    # abort at exit (SIGABRT, "terminate called without an active exception": a gloo worker
    # thread releasing an all_reduce's tensor needs the GIL while Python finalises).
    del pipe, mesh
    gc.collect()
    dist.barrier()
    return out


# -- parent side ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    m = p.add_argument_group("model and batch")
    m.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--seq", type=int, default=128)
    m.add_argument("--vocab", type=int, default=2048)
    m.add_argument("--mb-size", type=int, default=4, help="sequences per microbatch (fixed)")
    m.add_argument("--microbatches", default="4,8,16,32", help="comma-separated values of m")
    r = p.add_argument_group("run")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--nccl-semantics", action="store_true",
                      help="only the NCCL-semantics emulation on gloo (emulate_nccl=True)")
    mode.add_argument("--plain", action="store_true", help="only plain gloo transfers")
    r.add_argument("--steps", type=int, default=2, help="timed steps per m")
    r.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    r.add_argument("--retries", type=int, default=1,
                   help="relaunch a group whose rank died this many times (JSON: attempts)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=300.0, help="seconds before a wait fails")
    return p.parse_args(argv)


def summarise(mode: str, spec: Spec, rank: int, res: dict[str, Any]) -> dict[str, Any]:
    """One JSON line for one rank of one (mode, m) group."""
    steps = res["step_s"]
    median = statistics.median(steps) if steps else None
    growth = (res["peak_rss_steps"] - res["rss_warm"]
              if res["peak_rss_steps"] is not None and res["rss_warm"] is not None else None)
    growth_built = res["peak_rss"] - res["rss_built"] if res["rss_built"] is not None else None
    return {
        "schedule": "1f1b", "pp": 2, "mode": mode, "microbatches": spec.microbatches,
        "mb_size": spec.mb_size, "global_batch": spec.microbatches * spec.mb_size, "rank": rank,
        "peak_activation_bytes": res["peak_activation_bytes"],
        "peak_stashed_bytes": res["peak_stashed_bytes"],
        "peak_send_bytes": res["peak_send_bytes"],
        "sends_per_step": res["sends_per_step"],
        "bytes_per_boundary": res["bytes_per_boundary"],
        "held_until_step_end_bytes": res["held_until_step_end_bytes"],
        "rss_built_mib": _mib(res["rss_built"]),
        "rss_warm_mib": _mib(res["rss_warm"]),
        "peak_rss_mib": _mib(res["peak_rss"]),
        "peak_rss_steps_mib": _mib(res["peak_rss_steps"]),
        "rss_growth_mib": _mib(growth),
        "rss_growth_from_built_mib": _mib(growth_built),
        "median_step_s": None if median is None else round(median, 4),
        "step_s_all": [round(s, 4) for s in steps],
        "tokens_per_s": None if not median else round(spec.microbatches * spec.mb_size
                                                      * spec.seq / median, 1),
        "loss": round(res["loss"], 6),
    }


COLUMNS = [  # (header, field, scale to MiB)
    ("counted", "peak_activation_bytes", True), ("stash", "peak_stashed_bytes", True),
    ("send", "peak_send_bytes", True), ("held(old)", "held_until_step_end_bytes", True),
    ("rss_peak", "peak_rss_mib", False), ("rss_warm", "rss_warm_mib", False),
    ("grow_step", "rss_growth_mib", False), ("grow_built", "rss_growth_from_built_mib", False),
]


def _cell(line: dict[str, Any], field: str, scale: bool) -> float | None:
    """A table value in MiB (None kept)."""
    v = line.get(field)
    if v is None:
        return None
    return v / MIB if scale else float(v)


def table(lines: list[dict[str, Any]]) -> str:
    """The human-readable table (MiB) and, per mode and rank, max/min over m."""
    head = f"{'mode':<15}{'rank':>4}{'m':>4}{'batch':>6}" + "".join(f"{h:>11}" for h, _, _ in COLUMNS)
    out = ["all memory in MiB; counted = stash + send (runtime meter); held(old) = m boundary "
           "tensors held until step end by the old runtime", head + f"{'step_s':>9}"]
    for line in sorted(lines, key=lambda d: (list(MODES).index(d["mode"]), d["rank"],
                                             d["microbatches"])):
        cells = "".join(("-" if v is None else f"{v:.1f}").rjust(11)
                        for v in (_cell(line, f, s) for _, f, s in COLUMNS))
        step = "-" if line["median_step_s"] is None else f"{line['median_step_s']:.3f}"
        out.append(f"{line['mode']:<15}{line['rank']:>4}{line['microbatches']:>4}"
                   f"{line['global_batch']:>6}{cells}{step:>9}")
    out.append("\nmax/min over m (1.00 = flat; held(old) grows as max m / min m):")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in lines:
        groups.setdefault((line["mode"], line["rank"]), []).append(line)
    for (mode, rank), group in groups.items():
        ratios = []
        for h, f, s in COLUMNS[:5]:
            vals = [_cell(d, f, s) for d in group]
            if None in vals or min(vals) <= 0:
                ratios.append(f"{h} -")
            else:
                ratios.append(f"{h} {max(vals) / min(vals):.2f}")
        steps = [d["median_step_s"] for d in group if d["median_step_s"]]
        ms = [d["microbatches"] for d in group]
        per_mb = ""
        if steps and len(steps) == len(ms):
            per_mb = f"; step_s/m {min(s / m for s, m in zip(steps, ms, strict=True)):.3f}-" \
                     f"{max(s / m for s, m in zip(steps, ms, strict=True)):.3f}"
        out.append(f"  {mode} rank {rank}: " + ", ".join(ratios) + per_mb)
    return "\n".join(out)


def run_group(spec: Spec, retries: int, timeout_s: float,
              label: str) -> tuple[dict[int, Any], int, str | None]:
    """Launch one fresh group; retry a failed one: (results by rank, attempts, last error)."""
    from conveyor.runtime.launch import launch

    error = None
    for attempt in range(1, retries + 2):
        try:
            results = launch(measure, 2, spec, timeout_s=timeout_s, threads_per_rank=1)
        except Exception as e:  # noqa: BLE001 - a rank died: reported, then retried
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"  {label}: attempt {attempt} failed ({error})", file=sys.stderr, flush=True)
            continue
        if sorted(results) == [0, 1]:
            return results, attempt, None
        error = f"only ranks {sorted(results)} returned"
    return {}, retries + 1, error


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every (mode, m) in its own group; print and return the JSON lines."""
    args = parse_args(argv)
    try:
        ms = [int(v) for v in args.microbatches.split(",") if v]
        model = ModelConfig(flavour=args.flavour, n_layers=args.layers, d_model=args.d_model,
                            n_heads=args.heads, vocab_size=args.vocab, max_seq_len=args.seq)
        for m in ms:
            ParallelConfig(pp=2, schedule="1f1b", microbatches=m).check_against(
                model, m * args.mb_size)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"boundary_memory: {e}") from None
    modes = ["nccl-semantics"] if args.nccl_semantics else ["gloo"] if args.plain else list(MODES)
    print(f"boundary_memory: 1f1b pp=2, {model.n_layers} layers, d_model {model.d_model}, "
          f"seq {args.seq}, vocab {model.vocab_size}, microbatch {args.mb_size} sequences, "
          f"m in {ms}, modes {modes}, {args.warmup}+{args.steps} steps, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    lines: list[dict[str, Any]] = []
    for mode in modes:
        for m in ms:
            spec = Spec(model=model, microbatches=m, mb_size=args.mb_size, seq=args.seq,
                        steps=args.steps, warmup=args.warmup, seed=args.seed,
                        emulate_nccl=MODES[mode], timeout_s=args.timeout)
            t = time.perf_counter()
            results, attempts, error = run_group(spec, args.retries, args.timeout, f"{mode} m={m}")
            if error is not None:
                line = {"schedule": "1f1b", "pp": 2, "mode": mode, "microbatches": m,
                        "attempts": attempts, "error": error}
                print(json.dumps(line), flush=True)
                continue
            for rank in sorted(results):
                line = summarise(mode, spec, rank, results[rank])
                line["attempts"] = attempts
                lines.append(line)
                print(json.dumps(line), flush=True)
            print(f"  {mode} m={m}: {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    print(f"\n{table(lines)}\n(total {time.perf_counter() - t0:.0f}s; load average now "
          f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return lines


if __name__ == "__main__":
    main()
