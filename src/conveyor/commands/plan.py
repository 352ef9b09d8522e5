"""``conveyor plan``: search dp x pp x tp, schedule, microbatches, recompute, SP and ZeRO-1."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..config import ConfigError
from .simulate import MODEL_PRESETS, load_model_config

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``plan`` to the CLI."""
    p = sub.add_parser(
        "plan",
        help="choose the parallel layout of a model on a cluster; write it as a train config",
        description="Search data x pipeline x tensor parallelism, schedule, chunks, microbatch "
        "size and count, recomputation, sequence parallelism and ZeRO-1 under the memory "
        "limit; print the ranked layouts and why the first wins; write it as a TOML file that "
        "`conveyor train --config` runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="small",
                   help=f"model preset ({', '.join(MODEL_PRESETS)}) or a TOML/JSON file")
    p.add_argument("--gpus", type=int, default=2, help="devices in the cluster")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="devices per node (default: the device's)")
    p.add_argument("--device", default="cpu",
                   help="cpu (this machine, measured), a100, h100, or a .toml/.json device "
                   "file (fields of conveyor.sim.Device; `base = \"a100\"` to start from one)")
    p.add_argument("--batch", type=int, default=16, help="global batch, in sequences")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence "
                   "(default: the model's max_seq_len)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory per device to plan for (default: the device's)")
    p.add_argument("--dp-bucket-mb", type=float, default=25.0,
                   help="MiB per data-parallel gradient bucket")
    p.add_argument("--profile", action="store_true",
                   help="cpu only: measure gloo's collectives here (cached, see "
                   "--calibration) and time the finalists' compute with all their ranks at once "
                   "(the runtime's stage runner, replayed in schedule order) instead of the "
                   "FLOP model and the documented constants")
    p.add_argument("--calibration", default=None, metavar="FILE.json",
                   help="with --profile: where the measured collectives are cached (default: "
                   "$XDG_CACHE_HOME/conveyor/gloo-2ranks.json); an existing file is reused")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --profile: measure the collectives again, replacing the cache")
    p.add_argument("--top", type=int, default=10, help="layouts to print")
    p.add_argument("--out", default=None, metavar="FILE.toml",
                   help="write the first choice as a `conveyor train --config` file")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..plan import Cluster, plan, table, why, write_toml
    from ..runtime.profiling import profiling_runtime

    model = load_model_config(args.model)
    cluster = Cluster.build(args.device, args.gpus, args.gpus_per_node)
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise ConfigError(f"--memory-gib {args.memory_gib} must be > 0")
    start = time.perf_counter()
    runtime = profiling_runtime() if args.profile else None
    if runtime is not None and cluster.device.name == "cpu" and not cluster.device.collectives:
        from ..sim.cost import CostError
        from ..sim.gloo import calibrate, default_path

        path = args.calibration or default_path()
        try:
            cal = calibrate(path, launch=runtime.launch, refresh=args.recalibrate)
        except CostError as err:
            raise ConfigError(str(err)) from None
        cluster = cluster.calibrated(cal)
        fits = ", ".join(f"{op} {f.latency_s * 1e6:.0f} us + {f.bandwidth_Bps / 1e9:.2f} GB/s"
                         for op, f in cal.fits.items())
        print(f"measured ({path}): {fits}")
    result = plan(model, cluster, global_batch=args.batch,
                  seq_len=args.seq_len or model.max_seq_len,
                  memory_limit=None if args.memory_gib is None else args.memory_gib * 2**30,
                  dp_bucket_mb=args.dp_bucket_mb, profile=runtime)
    print(table(result, args.top))
    print(f"planned in {time.perf_counter() - start:.2f} s\n\nwhy: {why(result)}")
    if args.out:
        print(f"wrote {write_toml(result, args.out)}  (run it: conveyor train --config "
              f"{args.out})")
    return 0
