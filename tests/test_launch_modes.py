"""The same training command under torchrun, and with bf16 autocast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.train.metrics import read_metrics, train_rows

pytestmark = pytest.mark.multiprocess

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2", "--eval-every", "0",
        "--checkpoint-every", "0", "--steps", "4", "--lr", "1e-2", "--warmup", "1"]


def test_torchrun_runs_the_same_training_as_local_spawn(tmp_path: Path, corpus: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    runs = tmp_path / "runs"
    args = ["train", "--data", str(corpus), "--pp", "2", *TINY, "--run-dir", str(runs)]
    assert main([*args, "--name", "spawned"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "conveyor", *args,
         "--name", "torchrun"],
        check=True, env=env, timeout=240, capture_output=True,
    )
    spawned = [r["loss"] for r in train_rows(read_metrics(runs / "spawned" / "metrics.jsonl"))]
    launched = [r["loss"] for r in train_rows(read_metrics(runs / "torchrun" / "metrics.jsonl"))]
    assert len(spawned) == 4 and launched == spawned  # same layout, same seed: bit-identical
    config = json.loads((runs / "torchrun" / "config.json").read_text())
    assert config["parallel"]["pp"] == 2


def test_bf16_autocast_trains(tmp_path: Path, corpus: Path) -> None:
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--pp", "2", *TINY, "--bf16",
                 "--run-dir", str(runs), "--name", "bf16"]) == 0
    losses = [r["loss"] for r in train_rows(read_metrics(runs / "bf16" / "metrics.jsonl"))]
    assert len(losses) == 4 and all(x == x for x in losses)  # finite, not NaN
    assert losses[-1] < losses[0]
