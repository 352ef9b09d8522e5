"""`conveyor schedule show` and `conveyor simulate` from the command line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conveyor.cli import main


def test_schedule_show_prints_table_and_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "show", "--schedule", "1f1b", "--pp", "3", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3" in out
    assert "bubble fraction: 0.3333" in out
    assert "rank 0: 3, rank 1: 2, rank 2: 1" in out


def test_schedule_file_round_trip_and_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "zb.csv"
    assert main(["schedule", "show", "--schedule", "zb-h1", "--pp", "2", "--microbatches", "4",
                 "--csv", str(csv)]) == 0
    capsys.readouterr()
    assert csv.read_text().splitlines()[1] == "0,F0,F1,I0,W0,F2,I1,W1,F3,I2,W2,I3,W3"
    assert main(["schedule", "show", "--schedule-file", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "schedule 'zb-h1'" in out and "I = input grad, W = weight grad" in out
    assert "rank 1: .  F0 I0 F1 I1 W0 F2 I2 W1 F3 I3 W2 W3" in out
    # held until the W: rank 1 runs each W a step late, so it holds 2, as rank 0 does
    assert "(F done, B or W not yet): rank 0: 2, rank 1: 2" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("0,F0,B0\n1,F0,X0\n")
    assert main(["schedule", "show", "--schedule-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank 1, column" in err and "'X0' is not an action" in err


def test_wrong_virtual_stages_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "show", "--schedule", "zb-v", "--virtual", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "set virtual_stages=2" in err


def test_simulate_h100_writes_png_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, trace = tmp_path / "sim.png", tmp_path / "trace.json"
    assert main(["simulate", "--model", "gpt2-124m", "--device", "h100", "--pp", "4",
                 "--microbatches", "8", "--schedule", "1f1b", "--out", str(png),
                 "--trace-json", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "schedule 1f1b: 4 ranks" in out and "analytic h100" in out
    assert png.stat().st_size > 10_000
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("ph") == "X" and e["name"].startswith("F")) == 4 * 8


def test_simulate_rejects_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--model", "gpt5"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def step_ms(out: str) -> float:
    """The step time ``conveyor simulate`` printed, in ms."""
    return float(re.search(r"; step (\S+) ms", out)[1])


def test_simulate_takes_train_partition_options(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # "small" is the model: vocab 8192, d_model 256, 8 layers; the head's vocab
    # projection weighs about 2.6 layers
    printed = {}
    for how in ("uniform", "cost"):
        assert main(["simulate", "--model", "small", "--device", "h100", "--pp", "2",
                     "--microbatches", "4", "--partition", how,
                     "--out", str(tmp_path / f"{how}.png")]) == 0
        printed[how] = capsys.readouterr().out
    assert "partition uniform [0:5 | 5:10]" in printed["uniform"]
    assert "partition cost [0:6 | 6:10]" in printed["cost"]  # fewer layers beside the head
    assert "stage 1 on rank 1: blocks 6:10 (layers 5-7 + head)" in printed["cost"]


    assert step_ms(printed["cost"]) < step_ms(printed["uniform"])


def test_simulate_predicts_lent_cores_on_cpu_only(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--model", "small", "--pp", "2", "--microbatches", "4", "--out", "none"]
    assert main(argv) == 0
    own = capsys.readouterr().out
    assert main([*argv, "--lend-cores"]) == 0
    lent = capsys.readouterr().out
    if len(os.sched_getaffinity(0)) >= 2:
        speedup = float(re.search(r"--lend-cores: measured here, k ranks' threads run an action "
                                  r"2: (\S+)x as fast", lent)[1])
        # 0F0 and 0B3 run that much faster (slower, should a busy machine measure < 1)
        assert (step_ms(lent) < step_ms(own)) == (speedup > 1)
    else:
        assert "no cores lent" in lent
    assert main([*argv, "--device", "h100", "--lend-cores"]) == 2
    assert "use it with --device cpu" in capsys.readouterr().err


def test_schedule_show_writes_torchs_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "dpv.csv"
    assert main(["schedule", "show", "--schedule", "dualpipev", "--pp", "2", "--microbatches",
                 "4", "--csv", str(csv), "--csv-style", "torch"]) == 0
    capsys.readouterr()
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B")  # no rank column
    assert main(["schedule", "show", "--schedule-file", str(csv)]) == 0
    assert "2 ranks, 4 stages (vshape placement), 4 microbatches" in capsys.readouterr().out
