"""``conveyor simulate``: predict a schedule's step time, bubble and memory, and draw it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import PARTITIONS, ConfigError, ModelConfig, ParallelConfig
from ..schedules import SCHEDULES
from .checks import output_file, positive

if TYPE_CHECKING:
    from ..sim.cost import CostModel

__all__ = ["register", "MODEL_PRESETS", "load_model_config"]

MODEL_PRESETS: dict[str, ModelConfig] = {
    "demo": ModelConfig(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, max_seq_len=128),
    "small": ModelConfig(),
    "gpt2-124m": ModelConfig(vocab_size=50304, n_layers=12, d_model=768, n_heads=12,
                             max_seq_len=1024, tie_embeddings=True),
    "gpt2-1.5b": ModelConfig(vocab_size=50304, n_layers=48, d_model=1600, n_heads=25,
                             max_seq_len=1024, tie_embeddings=True),
    "llama-7b": ModelConfig(flavour="llama", vocab_size=32000, n_layers=32, d_model=4096,
                            n_heads=32, d_ff=11008, max_seq_len=4096),
}
"""Named model shapes for predictions; ``small`` is ModelConfig's defaults."""

MAX_DRAWN_ACTIONS = 50_000
"""More boxes than this take minutes to draw and cannot be told apart in a PNG."""


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, or a TOML/JSON file holding model fields (top level or under [model])."""
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a file; "
            "pass a preset name or a TOML/JSON file with model fields"
        )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as err:  # JSON and TOML errors are ValueErrors
        raise ConfigError(f"--model {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}"
                          f" ({err}); fix the file or pass a preset name") from None
    raw = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"--model {path} must hold a table of model fields, not "
                          f"{type(raw).__name__}; e.g. {{\"n_layers\": 4}}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(
            f"{path}: unknown model field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    return ModelConfig(**raw)


def register(sub: Any) -> None:
    """Add ``simulate`` to the CLI."""
    p = sub.add_parser(
        "simulate",
        help="predict step time, bubble and memory of a schedule; draw its timeline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="small",
                   help=f"model preset ({', '.join(MODEL_PRESETS)}) or a TOML/JSON file")
    p.add_argument("--schedule", default="1f1b",
                   choices=sorted(s for s in SCHEDULES if s != "forward-only"))
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--virtual", type=int, default=None,
                   help="model chunks per rank (default: what the schedule needs)")
    p.add_argument("--partition", default=ParallelConfig().partition, choices=PARTITIONS,
                   help="blocks to stages, as in `conveyor train`: uniform (equal layer counts), "
                   "params (balanced parameters) or cost (balanced predicted compute)")
    p.add_argument("--microbatch-size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: model max)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks per stage (collectives on the intra-node link "
                   "while tp <= --gpus-per-node)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas (bucketed gradient reduction overlapped with "
                   "the last backward)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp > 1: all-gather/reduce-scatter pairs instead of all-reduces")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                   help="activation recomputation in backward")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1), help="1: ZeRO-1")
    p.add_argument("--dp-bucket-mb", type=float, default=ParallelConfig().dp_bucket_mb,
                   help="MiB per data-parallel gradient bucket (0: one for the whole stage)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="devices per node (default: the device preset's)")
    p.add_argument("--device", default="cpu",
                   help="cost preset: cpu (measured here), a100, h100 (analytic FLOP model)")
    p.add_argument("--profile", action="store_true",
                   help="cpu only: time the real model's stages here instead of the FLOP model")
    p.add_argument("--lend-cores", action="store_true",
                   help="cpu only: predict `conveyor train --lend-cores` (actions that run alone "
                   "use the idle ranks' threads; their speedup is measured here)")
    p.add_argument("--out", default="simulation.png",
                   help="Gantt chart PNG to write ('none': no chart)")
    p.add_argument("--trace-json", default=None, help="also write a Chrome/Perfetto trace here")
    p.set_defaults(run=_run)


def _lend_cores(args: argparse.Namespace, cfg: ModelConfig, seq: int,
                cost: CostModel) -> CostModel:
    """``cost`` with the measured speedup of lent threads, as ``--lend-cores`` runs on this CPU."""
    from ..sim.block_profile import thread_speedups
    from ..threads import available_cores

    if args.device != "cpu":
        raise ConfigError("--lend-cores lends a CPU's idle cores; use it with --device cpu")
    world, cores = args.pp * args.dp * args.tp, available_cores()
    if world > cores:
        print(f"--lend-cores: no cores lent: {world} ranks of one thread already take more "
              f"than this machine's {cores} cores\n")
        return cost
    speedup = thread_speedups(cfg, microbatch_size=args.microbatch_size, seq_len=seq,
                              max_threads=min(args.pp, cores))
    print("--lend-cores: measured here, k ranks' threads run an action "
          + ", ".join(f"{k}: {v:.2f}x" for k, v in enumerate(speedup, 1) if k > 1) + " as fast\n")
    return dataclasses.replace(cost, thread_speedup=speedup)


def _run(args: argparse.Namespace) -> int:
    from ..parallel.layout import resolve_layout
    from ..sim import (
        analytic_costs,
        get_device,
        profile_costs,
        render_gantt,
        simulate,
        write_chrome_trace,
    )

    for flag in ("pp", "microbatches", "virtual", "microbatch_size", "seq_len"):
        positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
    draw = args.out.lower() != "none"
    if draw:
        output_file(args.out, "--out")
        actions = 2 * args.pp * args.microbatches * (args.virtual or 1)
        if actions > MAX_DRAWN_ACTIONS:
            raise ConfigError(f"--pp {args.pp} x --microbatches {args.microbatches} is too large "
                              f"to draw ({actions} actions > {MAX_DRAWN_ACTIONS}); pass --out none "
                              "for the figures alone, or fewer microbatches")
    if args.trace_json:
        output_file(args.trace_json, "--trace-json")
    cfg = load_model_config(args.model)
    seq = args.seq_len or cfg.max_seq_len
    par = ParallelConfig(pp=args.pp, dp=args.dp, tp=args.tp,
                         sequence_parallel=args.sequence_parallel, schedule=args.schedule,
                         microbatches=args.microbatches, virtual_stages=args.virtual,
                         partition=args.partition, recompute=args.recompute, zero=args.zero,
                         dp_bucket_mb=args.dp_bucket_mb)
    layout = resolve_layout(cfg, par, seq_len=seq,
                            batch_size=args.microbatch_size * args.microbatches * args.dp)
    print(layout.describe() + "\n")
    partition, schedule = layout.partition, layout.schedule
    if args.profile:
        if args.device != "cpu":
            raise ConfigError("--profile measures this machine; use it with --device cpu")
        if args.tp * args.dp > 1 or args.recompute != "none":
            raise ConfigError("--profile times one pipeline's stages; drop --tp, --dp and "
                              "--recompute, or use the analytic model (no --profile)")
        from ..runtime.stage import StageRunner

        cost = profile_costs(cfg, partition, microbatch_size=args.microbatch_size, seq_len=seq,
                             runner=StageRunner)
    else:
        device = get_device(args.device)
        if args.gpus_per_node is not None:
            if args.gpus_per_node < 1:
                raise ConfigError(f"--gpus-per-node {args.gpus_per_node} must be >= 1")
            device = dataclasses.replace(device, gpus_per_node=args.gpus_per_node)
        cost = analytic_costs(
            cfg, partition, microbatch_size=args.microbatch_size, seq_len=seq, device=device,
            tp=args.tp, dp=args.dp, sequence_parallel=args.sequence_parallel,
            recompute=args.recompute, dp_bucket_mb=args.dp_bucket_mb, zero=args.zero,
        )
    if args.lend_cores:
        cost = _lend_cores(args, cfg, seq, cost)
    result = simulate(schedule, cost)
    print(result.table())
    title = (f"{args.schedule} pp={args.pp} tp={args.tp} dp={args.dp} m={args.microbatches} "
             f"on {args.device} (simulated)")
    if draw:
        print(f"\nwrote {render_gantt(result.timeline, args.out, title=title)}")
    if args.trace_json:
        print(f"wrote {write_chrome_trace({'simulated': result.timeline}, args.trace_json)}")
    return 0
