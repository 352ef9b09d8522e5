"""A run's directory: its name, and the files written before the first step.

    runs/<name>/
      config.json     every config section, and the checkpoint a resumed run came from
      tokenizer.json  the tokenizer the token ids mean
      metrics.jsonl   one row per step and per evaluation (see metrics.py)
      checkpoints/    step-N/ directories (see checkpoint.py)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..data.tokenizer import Tokenizer
from ..runtime.launch import under_torchrun
from .metrics import METRICS_FILE, MetricsWriter, read_metrics

__all__ = ["CONFIG_FILE", "TIMELINE_FILE", "TOKENIZER_FILE", "TRACE_FILE", "create_run_dir"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
TIMELINE_FILE = "timeline.json"  # the traced step, per rank (``conveyor train --trace``)
TRACE_FILE = "trace.json"  # the same step for chrome://tracing or ui.perfetto.dev


def _run_path(run: RunConfig) -> tuple[Path, bool]:
    """The run's directory, and whether the user named it (then it must not exist yet)."""
    root = Path(run.train.run_dir)
    if run.train.name is not None:
        return root / run.train.name, True
    if under_torchrun():  # every rank runs this: they must agree without talking
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":
            raise ConfigError("under torchrun pass --name (or --rdzv-id) so that every rank "
                              "writes the same run directory")
        return root / f"torchrun-{run_id}", True
    base = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    return path, False


def create_run_dir(run: RunConfig, tokenizer: Tokenizer, ckpt: Path | None = None,
                   ckpt_step: int | None = None, *, reuse: bool = False) -> Path:
    """Create ``run_dir/<name>/`` with config.json, tokenizer.json, metrics.jsonl, checkpoints/.

    A run resumed from ``ckpt`` (at ``ckpt_step``) starts its metrics.jsonl with the rows
    of the run it continues, up to that step. With ``reuse`` (``--resume auto``) an
    existing directory of that name is continued in place: its checkpoints stay, its
    metrics are cut back to the checkpoint's step. Under torchrun only rank 0 writes;
    every rank returns the same path.
    """
    path, named = _run_path(run)
    if int(os.environ.get("RANK", "0")) != 0:
        return path
    if named and path.exists() and not reuse:
        raise ConfigError(
            f"run directory {path} already exists; pass another --name, "
            f"or --resume {path} to continue it in a new one"
        )
    source = ckpt.parent.parent / METRICS_FILE if ckpt is not None else None
    # read before writing: under --resume auto the source is the file about to be replaced
    rows = read_metrics(source) if source is not None and source.is_file() else []
    (path / "checkpoints").mkdir(parents=True, exist_ok=reuse)
    config = {**run.to_dict(), "resumed_from": str(ckpt) if ckpt else None}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(path / TOKENIZER_FILE)
    (path / METRICS_FILE).unlink(missing_ok=True)
    with MetricsWriter(path / METRICS_FILE) as metrics:
        # a resumed run starts with the curve of the run it continues, up to the checkpoint
        for row in rows:
            if ckpt_step is not None and row["step"] <= ckpt_step:
                metrics.write(row)
    return path
