"""How Conveyor's cost grows with work, beside torch.distributed.pipelining, and the
end-to-end ``conveyor train`` throughput beside the step alone.

    python benchmarks/scaling.py [--quick] [--steps 4] [--no-train]

Three sweeps at pp=2 with 1F1B (2 ranks, 1 thread each), one JSON line per point on
stdout:

- ``model``: the model grows (layers x width) at a fixed batch and 8 microbatches;
- ``microbatches``: 4 .. 64 microbatches of a fixed model and global batch (each
  microbatch smaller: the runtime's per-action cost weighs more and more);
- ``train``: ``conveyor train`` end to end (optimizer, clipping, data loading,
  metrics) on the default model, its median tokens/s from ``metrics.jsonl`` over the
  step-only tokens/s of the same layout.

Each point of the first two runs ``step_time.py``'s group (Conveyor's default split,
torch on the hand-written uniform split and on ours) and reports tokens/s of each and
the ratios ``vs_torch`` (our step time over torch's uniform one; lower is better) and
``vs_torch_same_split``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402

MODELS = [(4, 128), (8, 256), (8, 512), (16, 512)]
MICROBATCHES = [4, 8, 16, 32, 64]


def _group(extra: list[str]) -> dict[str, dict[str, Any]]:
    """Run one step_time group quietly; its lines by config name."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        lines = step_time.main(["--schedules", "1f1b", "--no-single", *extra])
    return {line["config"]: line for line in lines}


def _point(sweep: str, extra: list[str], **fields: Any) -> dict[str, Any]:
    lines = _group(extra)
    ours = lines["pp2-1f1b-conveyor-default"]
    torch_uniform = lines.get("pp2-1f1b-torch", {})
    torch_same = lines.get("pp2-1f1b-torch-balanced", {})
    return {
        "sweep": sweep, **fields,
        "conveyor_tokens_per_s": ours.get("tokens_per_s"),
        "torch_tokens_per_s": torch_uniform.get("tokens_per_s"),
        "torch_same_split_tokens_per_s": torch_same.get("tokens_per_s"),
        "vs_torch": ours.get("vs_torch"), "vs_torch_same_split": ours.get("vs_torch_same_split"),
        "conveyor_us_per_action": ours.get("us_per_action"),
        "torch_us_per_action": torch_uniform.get("us_per_action"),
        "stage_blocks": ours.get("stage_blocks"),
    }


def _train_point(steps: int, timing: list[str]) -> dict[str, Any]:
    """``conveyor train`` end to end beside the step-only number of the same layout."""
    from conveyor.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        # step_time's default model (the CLI's own defaults are smaller)
        args = ["train", "--layers", "8", "--d-model", "256", "--heads", "4", "--vocab-size",
                "8192", "--seq-len", "128", "--pp", "2", "--microbatches", "8", "--batch-size", "16",
                "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "0",
                "--run-dir", tmp, "--name", "bench"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli(args)
        if code:
            return {"sweep": "train", "error": f"conveyor train exited {code}"}
        rows = [json.loads(line) for line in (Path(tmp) / "bench" / "metrics.jsonl").open()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]  # after warm-up
    step_only = _group(["--microbatches", "8", "--batch", "16", "--no-torch", *timing])
    step = step_only["pp2-1f1b-conveyor-default"]["tokens_per_s"]
    e2e = statistics.median(speeds)
    return {"sweep": "train", "train_tokens_per_s": round(e2e, 1), "step_tokens_per_s": step,
            "train_over_step": round(e2e / step, 3), "steps_measured": len(speeds)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweeps; print and return the JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per point")
    ap.add_argument("--quick", action="store_true", help="one tiny point per sweep (a smoke run)")
    ap.add_argument("--no-train", action="store_true", help="skip the end-to-end train sweep")
    ap.add_argument("--sweeps", default="model,microbatches,train",
                    help="comma-separated subset of model, microbatches, train")
    ap.add_argument("--microbatch-counts", default=",".join(map(str, MICROBATCHES)),
                    help="microbatch counts of the microbatches sweep")
    args = ap.parse_args(argv)
    timing = ["--steps", str(args.steps), "--warmup", "1"]
    sweeps = set(args.sweeps.split(","))
    counts = [int(m) for m in args.microbatch_counts.split(",") if m]
    models, mbs = (MODELS, counts) if not args.quick else ([(2, 32)], [4])
    models = models if "model" in sweeps else []
    mbs = mbs if "microbatches" in sweeps else []
    size = [] if not args.quick else ["--heads", "2", "--seq", "16", "--vocab", "128"]
    out = []
    for layers, width in models:
        line = _point("model", ["--layers", str(layers), "--d-model", str(width), *size, *timing],
                      layers=layers, d_model=width)
        out.append(line)
        print(json.dumps(line), flush=True)
    batch = 64 if not args.quick else 8
    for m in mbs:
        line = _point("microbatches", ["--microbatches", str(m), "--batch", str(batch), *size,
                                       *timing], microbatches=m, batch=batch)
        out.append(line)
        print(json.dumps(line), flush=True)
    if not args.no_train and "train" in sweeps:
        line = _train_point(max(args.steps + 2, 6), timing)
        out.append(line)
        print(json.dumps(line), flush=True)
    return out


if __name__ == "__main__":
    main()
