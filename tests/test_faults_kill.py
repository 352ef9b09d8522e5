"""Fault suite: a rank SIGKILLed at chosen points of a 2-rank run (during start-up, after a
step, after writing its checkpoint shard, while rank 0 publishes a checkpoint). Each time: one line naming the
dead rank, the run ends within its timeout, no rank is left running, and ``--resume auto``
then trains to losses bit-identical with a run that was never interrupted."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.runtime.faults import FAULT_ENV
from conveyor.train.metrics import read_metrics, train_rows

pytestmark = pytest.mark.multiprocess

STEPS = 8
TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2", "--pp", "2",
        "--val-fraction", "0", "--lr", "1e-2", "--steps", str(STEPS), "--checkpoint-every", "2",
        "--keep", "0", "--timeout", "20"]

# (point, rank); the pass at which it fires is drawn from the seed
POINTS = {0: ("step", 1), 1: ("save.shard", 1), 2: ("save.publish", 0), 3: ("start", 1)}


def _argv(tmp: Path, corpus: Path, name: str) -> list[str]:
    return ["train", "--data", str(corpus), *TINY, "--run-dir", str(tmp / "runs"),
            "--cache-dir", str(tmp / "cache"), "--resume", "auto", "--name", name]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in train_rows(read_metrics(run / "metrics.jsonl"))]


def _live_children() -> list[int]:
    """This process's children that are still running, multiprocessing's resource tracker aside."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and b"resource_tracker" not in cmdline:
            live.append(int(entry.name))
    return live


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    from conftest import WORDS

    tmp = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
            for _ in range(150)))
    assert main(_argv(tmp, corpus, "straight")) == 0
    losses = _losses(tmp / "runs" / "straight")
    assert len(losses) == STEPS
    return tmp, losses


@pytest.mark.parametrize("seed", sorted(POINTS))
def test_killed_rank_then_resume_auto(seed: int, straight: tuple[Path, list[float]],
                                      capfd: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, expected = straight
    point, rank = POINTS[seed]
    nth = 1 if point == "start" else random.Random(seed).randint(
        1, STEPS - 1 if point == "step" else STEPS // 2 - 1)
    argv = _argv(tmp, tmp / "corpus", f"killed-{seed}")
    capfd.readouterr()

    monkeypatch.setenv(FAULT_ENV, f"{point}:{rank}:{nth}")
    t0 = time.monotonic()
    assert main(argv) == 1
    elapsed = time.monotonic() - t0
    monkeypatch.delenv(FAULT_ENV)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("conveyor train: error: ")]
    assert len(errors) == 1, err
    assert f"rank {rank} (pid " in errors[0] and "died: signal SIGKILL" in errors[0], errors[0]
    assert elapsed < 60, f"{point}:{rank}:{nth}: the run took {elapsed:.0f}s to end"
    print(f"killed rank {rank} at {point} pass {nth}: ended after {elapsed:.1f}s: {errors[0]}")
    assert _live_children() == [], "a rank outlived the failed run"

    assert main(argv) == 0  # the restart: newest intact checkpoint, or from the start
    assert _losses(tmp / "runs" / f"killed-{seed}") == expected


def test_torchrun_max_restarts_with_resume_auto_survives_a_killed_rank(
        straight: tuple[Path, list[float]]) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    tmp, expected = straight
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env[FAULT_ENV] = f"step:1:5:{tmp / 'killed-once'}"  # the first attempt loses rank 1
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m",
         "conveyor", *_argv(tmp, tmp / "corpus", "elastic")[:]],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp / "killed-once").exists()  # the fault fired, and the restart got past it
    assert _losses(tmp / "runs" / "elastic") == expected


def test_a_rank_stalled_in_a_checkpoint_save_ends_within_the_timeout(
        straight: tuple[Path, list[float]], capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _ = straight
    capfd.readouterr()
    monkeypatch.setenv(FAULT_ENV, "stall/save.shard:1:1")
    t0 = time.monotonic()
    code = main([*_argv(tmp, tmp / "corpus", "stalled"), "--timeout", "5"])
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("conveyor train: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "rank 0: saving a checkpoint: rank 0 waited for the other ranks and gave up" in lines[0]
    assert "--timeout" in lines[0]
    assert elapsed < 60, f"the stalled save took {elapsed:.0f}s to end"
    assert _live_children() == []


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_die_with_a_sigkilled_torchrun_agent(straight: tuple[Path, list[float]]) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    tmp, _ = straight
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env[FAULT_ENV] = "stall/step:1:2"  # rank 1 hangs after its second step: the run never ends
    agent = subprocess.Popen(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "conveyor",
         *_argv(tmp, tmp / "corpus", "orphans")], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks := _children_of(agent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(ranks) == 2, "torchrun did not start its 2 ranks"
        metrics = tmp / "runs" / "orphans" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.2)
        agent.kill()  # SIGKILL: the agent cannot stop its ranks itself
        agent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [r for r in ranks if _alive(r)], "ranks outlived their SIGKILLed agent"
    finally:
        agent.kill()
        for r in ranks:
            if _alive(r):
                os.kill(r, 9)
