"""Preemption and restarts: SIGTERM stops every rank at a step boundary with a checkpoint,
a second signal aborts at once, ``--resume auto`` picks the newest intact checkpoint,
and every resumed run continues with bit-identical losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.runtime.launch import Preempted, launch
from conveyor.train.metrics import read_metrics, train_rows

pytestmark = pytest.mark.multiprocess

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2", "--pp", "2",
        "--val-fraction", "0", "--lr", "1e-2"]


def _argv(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), *TINY, "--run-dir", str(tmp / "runs"),
            "--cache-dir", str(tmp / "cache"), *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(read_metrics(run / "metrics.jsonl"))}


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_gone(pids: set[int], within: float = 10.0) -> None:
    """Every process in ``pids`` exits within seconds (multiprocessing's resource tracker
    lingers a moment after its parent)."""
    deadline = time.monotonic() + within
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "a child outlived the run"


def test_sigterm_checkpoints_then_resume_is_bit_identical(tmp_path: Path, corpus: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    steps = ["--steps", "60", "--checkpoint-every", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli",
                             *_argv(tmp_path, corpus, *steps, "--name", "stopped")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"step": 2,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1] if "resource_tracker" not in err else \
        [ln for ln in err.splitlines() if ln.startswith("conveyor train:")][-1]
    assert "Traceback" not in err
    assert last.startswith("conveyor train: stopped by SIGTERM at step "), err
    assert "continue with `conveyor train --resume" in last
    _assert_gone(ranks)
    stopped = _losses(tmp_path / "runs" / "stopped")
    at = max(stopped)
    assert 2 <= at < 60
    assert [p.name for p in (tmp_path / "runs" / "stopped" / "checkpoints").iterdir()] == [
        f"step-{at:08d}"]

    # the uninterrupted run, and the stopped one resumed: the same losses, bit for bit
    assert main(_argv(tmp_path, corpus, *steps, "--name", "straight")) == 0
    straight = _losses(tmp_path / "runs" / "straight")
    assert main(["train", "--resume", str(tmp_path / "runs" / "stopped"), "--name", "resumed",
                 "--run-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]) == 0
    resumed = _losses(tmp_path / "runs" / "resumed")
    assert {s: stopped[s] for s in range(1, at + 1)} == {s: straight[s] for s in range(1, at + 1)}
    assert resumed == straight
    capsys.readouterr()


def _ready_then_sleep(marker: Path, handler: bool) -> None:
    import torch.distributed as dist

    from conveyor.runtime.preempt import StopRequest

    if handler:
        StopRequest()
    (marker / str(dist.get_rank())).touch()
    time.sleep(60)


def _signal_me_when_ready(marker: Path, *delays: float) -> None:
    """SIGTERM to this process once both ranks are up, once per delay."""
    def send() -> None:
        while len(list(marker.iterdir())) < 2:
            time.sleep(0.05)
        for d in delays:
            time.sleep(d)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()


def test_second_signal_kills_the_ranks_at_once(tmp_path: Path) -> None:
    _signal_me_when_ready(tmp_path, 0.2, 0.5)  # the ranks note the first and sleep on
    t0 = time.monotonic()
    with pytest.raises(Preempted, match="aborted by a second SIGTERM") as err:
        launch(_ready_then_sleep, 2, tmp_path, True, timeout_s=30)
    assert err.value.exit_code == 143
    assert time.monotonic() - t0 < 30


def test_forwarded_signal_ends_ranks_without_a_handler(tmp_path: Path) -> None:
    _signal_me_when_ready(tmp_path, 0.2)
    t0 = time.monotonic()
    with pytest.raises(Preempted, match="stopped by SIGTERM before a step boundary"):
        launch(_ready_then_sleep, 2, tmp_path, False, timeout_s=30)
    assert time.monotonic() - t0 < 30


def test_resume_auto_starts_fresh_then_falls_back_past_a_corrupt_checkpoint(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(tmp_path, corpus, "--steps", "6", "--checkpoint-every", "2", "--keep", "0",
                 "--resume", "auto", "--name", "elastic")
    assert main(argv) == 0  # nothing to resume: a fresh start
    run = tmp_path / "runs" / "elastic"
    first = _losses(run)
    ckpts = run / "checkpoints"
    shard = ckpts / "step-00000006" / "shard-1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    (ckpts / "step-00000006" / "meta.json").write_text("{}")  # and the newest's meta
    shard = ckpts / "step-00000004" / "shard-0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    capsys.readouterr()

    # an explicit path never falls back
    assert main(_argv(tmp_path, corpus, "--resume", str(ckpts / "step-00000004"), "--steps",
                      "6", "--name", "explicit")) == 2
    assert "step-00000004" in capsys.readouterr().err

    assert main(argv) == 0  # auto: step 6 and step 4 fail their checks, step 2 is intact
    err = capsys.readouterr().err
    for bad in ("step-00000006", "step-00000004"):
        assert f"skipping checkpoint {ckpts / bad}" in err
        assert f"resuming from {ckpts / 'step-00000002'} instead" in err
    assert _losses(run) == first
    assert main(argv) == 0  # once more: the run is complete, nothing to do
    assert "the run is complete" in capsys.readouterr().err
    assert _losses(run) == first


def test_sigterm_to_torchrun_checkpoints(tmp_path: Path, corpus: Path) -> None:
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "conveyor",
         *_argv(tmp_path, corpus, "--steps", "3000", "--checkpoint-every", "0", "--name", "tr")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "tr" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"step": 2,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the agent passes it on to both ranks
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    stopped = [ln for ln in err.splitlines() if ln.startswith("conveyor train: stopped by SIGTERM")]
    assert stopped, err[-2000:]
    at = int(stopped[0].split(" at step ")[1].split()[0])
    assert (tmp_path / "runs" / "tr" / "checkpoints" / f"step-{at:08d}" / "meta.json").is_file()
