"""Training from a hand-written schedule table, tracing its last step, and drawing
the trace beside its simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.schedules import Kind
from conveyor.sim.timeline_io import load_timeline

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "4", "--eval-every", "0",
        "--checkpoint-every", "0"]


@pytest.mark.multiprocess
def test_schedule_file_train_trace_and_draw(tmp_path: Path, corpus: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "mine.csv"
    assert main(["schedule", "show", "--schedule", "zb-h1", "--pp", "2", "--microbatches", "4",
                 "--csv", str(table)]) == 0
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--pp", "2", *TINY, "--steps", "3",
                 "--schedule-file", str(table), "--trace", "--run-dir", str(runs),
                 "--name", "t"]) == 0
    run = runs / "t"
    timeline, meta = load_timeline(run / "timeline.json")
    assert meta == {"step": 3, "schedule": "zb-h1"}
    assert sorted(timeline) == [0, 1]
    computes = [t.action for t in timeline[0] if t.action.kind.is_compute]
    assert len(computes) == 3 * 4  # F, B and W of 4 microbatches on stage 0
    assert any(t.action.kind is Kind.RECV_B for t in timeline[0])
    assert all(0 <= t.start <= t.end for row in timeline.values() for t in row)
    events = json.loads((run / "trace.json").read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("ph") == "X" and e["name"].startswith("W")) == 8
    capsys.readouterr()

    assert main(["trace", str(run)]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "simulated" in out
    assert (run / "trace.png").stat().st_size > 10_000


def test_bad_schedule_file_fails_before_spawn(tmp_path: Path, corpus: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "three.csv"
    assert main(["schedule", "show", "--schedule", "1f1b", "--pp", "3", "--microbatches", "4",
                 "--csv", str(table)]) == 0
    capsys.readouterr()
    code = main(["train", "--data", str(corpus), "--pp", "2", *TINY, "--steps", "1",
                 "--schedule-file", str(table), "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "has 3 ranks (rows) but pp=2; set pp=3" in err[-1]


def test_trace_without_timeline_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", str(tmp_path)]) == 2
    assert "train with `conveyor train --trace`" in capsys.readouterr().err
