"""What `conveyor plan` prints and writes: the ranked table, why the winner wins, a TOML file."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .estimate import Estimate
from .planner import Plan

__all__ = ["table", "why", "to_toml", "write_toml"]

_GIB = 2**30


def table(p: Plan, rows: int = 10) -> str:
    """The first ``rows`` layouts, best first, one line each."""
    head = (f"{'#':>2}  {'layout':<58} {'step s':>9} {'tokens/s':>10} {'MFU':>6} "
            f"{'mem GiB':>8} {'bubble':>7} {'comm':>6}")
    lines = [head]
    for i, e in enumerate(p.ranked[:rows], 1):
        mark = "" if e.simulated else "~"
        lines.append(
            f"{i:>2}  {e.candidate.label():<58} {mark + f'{e.step_s:.4g}':>9} "
            f"{e.tokens_per_s:>10.4g} {e.mfu:>6.1%} {e.peak_memory_bytes / _GIB:>8.2f} "
            f"{e.bubble:>7.1%} {e.comm_share:>6.1%}")
    nodes = (f"{p.cluster.gpus_per_node} per node" if p.cluster.gpus_per_node < p.cluster.gpus
             else "one node")
    lines.append(f"searched {p.searched} layouts on {p.cluster.gpus} x {p.cluster.device.name} "
                 f"({nodes}); ~: closed form, others simulated")
    return "\n".join(lines)


def why(p: Plan) -> str:
    """Why the first choice beats the runner-up, in the terms the model prices."""
    if len(p.ranked) < 2:
        return "it is the only layout that fits"
    a, b = p.ranked[0], p.ranked[1]
    ca, cb = a.candidate, b.candidate
    gain = b.step_s / a.step_s - 1
    diffs = [f"{name} {getattr(ca, f)} vs {getattr(cb, f)}"
             for name, f in (("dp", "dp"), ("pp", "pp"), ("tp", "tp"), ("schedule", "schedule"),
                             ("chunks", "virtual_stages"), ("microbatch", "microbatch_size"),
                             ("recompute", "recompute"), ("sequence parallel", "sequence_parallel"),
                             ("zero", "zero"))
             if getattr(ca, f) != getattr(cb, f)]
    # where the seconds go: the rank's own work, its idle time in the pipeline, the dp tail
    parts = {
        "compute (incl. tp collectives)": (a.compute_s, b.compute_s),
        "pipeline bubble": (a.bubble * (a.step_s - a.dp_exposed_s),
                            b.bubble * (b.step_s - b.dp_exposed_s)),
        "tensor-parallel collectives": (a.tp_s, b.tp_s),
        "exposed data-parallel reduction": (a.dp_exposed_s, b.dp_exposed_s),
    }
    ranked = sorted(parts.items(), key=lambda kv: kv[1][0] - kv[1][1])
    tiny = 1e-3 * a.step_s  # differences below this are rounding, not reasons
    reasons = [f"{name} {x:.4g} s vs {y:.4g} s" for name, (x, y) in ranked if x < y - tiny][:2]
    costs = [f"{name} {x:.4g} s vs {y:.4g} s" for name, (x, y) in ranked if x > y + tiny][-1:]
    text = (f"#1 steps {gain:.1%} faster than #2 ({'; '.join(diffs) or 'same shape'}): "
            f"{', '.join(reasons) or 'no single part'}")
    if costs:
        text += f"; it pays {costs[0]}"
    if a.peak_memory_bytes != b.peak_memory_bytes:
        text += (f"; memory {a.peak_memory_bytes / _GIB:.2f} vs "
                 f"{b.peak_memory_bytes / _GIB:.2f} GiB per device")
    return text + "."


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and math.isinf(v)) else "inf"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: an imported model's special_ids
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(p: Plan, choice: Estimate | None = None) -> str:
    """A `conveyor train --config` file: [model], [parallel] of the choice, [train] batch."""
    e = choice or p.best
    par = e.candidate.parallel_config(p.dp_bucket_mb)
    model = dataclasses.replace(p.model, max_seq_len=p.seq_len) if p.seq_len != \
        p.model.max_seq_len else p.model
    sections: dict[str, dict[str, Any]] = {
        "model": _fields(model),
        "parallel": _fields(par),
        "train": {"batch_size": p.global_batch},
    }
    lines = [f"# conveyor plan: {e.candidate.label()}",
             f"# predicted step {e.step_s:.4g} s, {e.tokens_per_s:.4g} tokens/s, MFU {e.mfu:.1%}, "
             f"{e.peak_memory_bytes / _GIB:.2f} GiB per device on {p.cluster.gpus} x "
             f"{p.cluster.device.name}"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _fields(cfg: Any) -> dict[str, Any]:
    # every field that has a value (TOML has no null), so the file does not depend on
    # `conveyor train`'s defaults; [train] and [data] keep those
    return {f.name: v for f in dataclasses.fields(cfg) if (v := getattr(cfg, f.name)) is not None}


def write_toml(p: Plan, path: str | Path) -> Path:
    """Write :func:`to_toml` to ``path``."""
    path = Path(path)
    path.write_text(to_toml(p))
    return path
