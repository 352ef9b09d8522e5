"""Smoke test of benchmarks/step_time.py: it runs, and every line is complete JSON.

Timings are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

REQUIRED = [
    "config", "schedule", "impl", "pp", "microbatches", "threads_per_rank", "median_step_s",
    "tokens_per_s", "bubble", "peak_stash_bytes", "max_rss_bytes", "vs_torch",
    "speedup_vs_1thread", "oversubscribed",
]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_step_time_tiny_model_prints_complete_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import step_time
    finally:
        sys.path.remove(str(BENCHMARKS))
    step_time.main([
        "--layers", "2", "--d-model", "32", "--heads", "2", "--seq", "16", "--vocab", "128",
        "--batch", "8", "--microbatches", "4", "--steps", "2", "--warmup", "1",
        "--schedules", "1f1b", "--lend",
    ])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(d["config"], d["impl"]) for d in lines] == [
        ("single-1t", "single"), ("single-2t", "single"),
        ("pp2-1f1b-conveyor-default", "conveyor"), ("pp2-1f1b-conveyor-uniform", "conveyor"),
        ("pp2-1f1b-conveyor-lend", "conveyor"),
        ("pp2-1f1b-torch", "torch"), ("pp2-1f1b-torch-balanced", "torch"),
    ]
    for d in lines:
        missing = [f for f in REQUIRED if f not in d]
        assert not missing, f"{d['config']} lacks {missing}"
        assert "error" not in d, d
        assert d["median_step_s"] > 0 and d["tokens_per_s"] > 0
        assert d["max_rss_bytes"] > 0
    ours, uniform, lend, theirs, balanced = lines[2:7]
    assert lend["vs_default"] is not None and lend["vs_torch"] is not None
    assert ours["vs_torch"] is not None and theirs["torch_schedule"] == "Schedule1F1B"
    for field in ("vs_torch_same_split", "vs_uniform", "vs_single_2t"):
        assert ours[field] is not None, field
    # each line says which split it ran; torch-balanced ran Conveyor's default one
    assert ours["partition"] == balanced["partition"] == "cost"
    assert uniform["partition"] == theirs["partition"] == "uniform"
    assert ours["stage_blocks"] == balanced["stage_blocks"]
    assert ours["peak_stash_bytes"] > 0 and theirs["peak_stash_bytes"] > 0
    assert 0 <= ours["bubble"] < 1
    # same model, same data, same init: the same loss, whatever the implementation
    assert ours["loss"] == pytest.approx(lines[0]["loss"], rel=1e-5)
    assert theirs["loss"] == pytest.approx(lines[0]["loss"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_scaling_sweeps_print_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import scaling
    finally:
        sys.path.remove(str(BENCHMARKS))
    lines = scaling.main(["--quick", "--no-train", "--steps", "1"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == lines
    assert [d["sweep"] for d in lines] == ["model", "microbatches"]
    for d in lines:
        assert d["conveyor_tokens_per_s"] > 0 and d["torch_tokens_per_s"] > 0
        assert d["vs_torch"] > 0 and d["conveyor_us_per_action"] > 0

def _benchmark(name: str) -> ModuleType:
    """The module of benchmarks/NAME.py (which imports its siblings)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_parallel_3d_tiny_model_prints_cases_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    parallel_3d = _benchmark("parallel_3d")
    parallel_3d.main([
        "--layers", "2", "--d-model", "32", "--heads", "2", "--seq", "16", "--vocab", "128",
        "--batch", "8", "--microbatches", "4", "--steps", "2", "--warmup", "1",
    ])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    *cases, ratios = lines
    assert [d["config"] for d in cases] == ["single-2t", "tp2", "pp2-1f1b", "dp2-bucketed",
                                           "dp2-per-param"]
    for d in cases:
        assert "error" not in d, d
        assert d["median_step_s"] > 0
        # one model, one batch, one init: the same loss however it is cut
        assert d["loss"] == pytest.approx(cases[0]["loss"], rel=1e-5)
    assert [(d["pp"], d["tp"], d["dp"]) for d in cases[1:]] == [(1, 2, 1), (2, 1, 1), (1, 1, 2),
                                                                 (1, 1, 2)]
    bucketed, per_param = cases[3]["dp_collectives_per_step"], cases[4]["dp_collectives_per_step"]
    assert 1 <= bucketed < per_param
    assert ratios["config"] == "ratios"
    assert all(ratios[k] > 0 for k in parallel_3d.RATIOS)

def test_plan_accuracy_tiny_model_compares_every_layout(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))  # spawned ranks import the worker from there too
    try:
        import plan_accuracy

        summary = plan_accuracy.main(["--layers", "2", "--d-model", "32", "--heads", "2",
                                      "--seq", "16", "--vocab", "128", "--batch", "16",
                                      "--reps", "1"])
    finally:
        sys.path.remove(str(BENCHMARKS))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == len(plan_accuracy.LAYOUTS) + 1 and lines[-1] == summary
    assert -1 <= summary["spearman"] <= 1  # timings are never asserted
    # memory is: the planner's activation model is the meter's count
    assert summary["worst_memory_error"] <= 0.10, lines
