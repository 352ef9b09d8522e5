"""`conveyor plan`: published numbers, closed forms against the simulator, TOML round trip."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from conveyor.cli import build_parser, main
from conveyor.commands.train import build_run_config
from conveyor.config import ConfigError, ModelConfig
from conveyor.plan import Candidate, Cluster, estimate, plan, simulate_candidate, to_toml, why
from conveyor.plan.published import (
    FIG13_MODEL,
    FIG13_SPLITS,
    MEGATRON_2021,
    TABLE1,
    predict_table1,
    table1_model,
)
from conveyor.runtime.profiling import profiling_runtime

TINY = ModelConfig(vocab_size=320, n_layers=4, d_model=32, n_heads=2, max_seq_len=16)


@pytest.mark.parametrize("row", TABLE1, ids=lambda r: f"{r.billions}B")
def test_table1_throughput_within_10_percent(row) -> None:
    predicted, _ = predict_table1(row)
    assert abs(predicted / row.tflops - 1) <= 0.10, (row, predicted)


def test_fig13_ranks_tp8_pp8_first() -> None:
    # under Table 1's assumptions, each split as the paper ran it
    tflops = {split: predict_table1(FIG13_MODEL, tp=split[0], pp=split[1])[0]
              for split in FIG13_SPLITS}
    assert max(tflops, key=tflops.get) == (8, 8), tflops
    # and the planner's own search over the five splits (tp 16 and 32 span nodes and
    # are pruned) chooses (8, 8) too
    p = plan(table1_model(FIG13_MODEL), Cluster(MEGATRON_2021, 64), global_batch=128,
             seq_len=2048, where=lambda c: (c.tp, c.pp) in FIG13_SPLITS)
    assert (p.best.candidate.tp, p.best.candidate.pp) == (8, 8)
    assert "faster than #2" in why(p)


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1),
                                        ("zb-h2", 1), ("zb-v", 2)])
def test_closed_form_agrees_with_the_simulator(schedule: str, v: int) -> None:
    model = ModelConfig(vocab_size=512, n_layers=16, d_model=512, n_heads=8, max_seq_len=256)
    cluster = Cluster.build("a100", 16)
    c = Candidate(tp=2, pp=4, dp=2, schedule=schedule, virtual_stages=v, microbatch_size=1,
                  microbatches=8, recompute="selective", sequence_parallel=True)
    closed = estimate(model, c, cluster, 256, 16)
    sim = simulate_candidate(model, c, cluster, 256, 16)
    assert closed.step_s == pytest.approx(sim.step_s, rel=0.08)
    assert closed.peak_activation_bytes == pytest.approx(sim.peak_activation_bytes, rel=0.10)


def test_thousand_gpus_plan_prunes_and_ranks() -> None:
    model = table1_model(TABLE1[6])  # 145.6B
    start = time.perf_counter()
    p = plan(model, Cluster.build("a100", 1024), global_batch=2048, seq_len=2048)
    elapsed = time.perf_counter() - start
    assert p.searched > 500 and len(p.ranked) > 10
    best = p.best
    assert best.peak_memory_bytes <= 80 * 2**30 and best.candidate.tp <= 8
    assert best.candidate.dp * best.candidate.pp * best.candidate.tp == 1024
    print(f"1024 GPUs planned in {elapsed:.2f} s ({p.searched} layouts)")  # not asserted


def test_memory_limit_forces_recompute_and_nothing_fits_is_one_line() -> None:
    model = table1_model(TABLE1[3])  # 18.4B on 8 GPUs
    roomy = plan(model, Cluster.build("a100", 8), global_batch=8, seq_len=2048,
                 memory_limit=1e15)
    tight = plan(model, Cluster.build("a100", 8), global_batch=8, seq_len=2048,
                 memory_limit=roomy.best.peak_memory_bytes * 0.8)
    assert tight.best.peak_memory_bytes <= roomy.best.peak_memory_bytes * 0.8
    assert tight.best.step_s >= roomy.best.step_s
    with pytest.raises(ConfigError, match="no layout of this model fits"):
        plan(model, Cluster.build("a100", 8), global_batch=8, seq_len=2048, memory_limit=1e9)


def test_written_toml_round_trips_through_train_config(tmp_path: Path) -> None:
    model_file = tmp_path / "tiny.toml"
    model_file.write_text("[model]\nvocab_size = 320\nn_layers = 4\nd_model = 32\nn_heads = 2\n"
                          "max_seq_len = 16\n")
    out = tmp_path / "plan.toml"
    assert main(["plan", "--model", str(model_file), "--gpus", "2", "--device", "cpu",
                 "--batch", "8", "--out", str(out)]) == 0
    args = build_parser().parse_args(["train", "--config", str(out)])
    run = build_run_config(args)
    p = plan(TINY, Cluster.build("cpu", 2), global_batch=8, seq_len=16)
    assert run.model == TINY
    assert run.train.batch_size == 8
    assert run.parallel.world_size == 2
    assert out.read_text() == to_toml(p)  # same search, same file
    assert run.parallel == p.best.candidate.parallel_config()


def test_device_file_and_bad_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "dev.toml"
    dev.write_text('base = "a100"\nname = "a100-40g"\nmemory_bytes = 42949672960\n')
    assert Cluster.build(str(dev), 8).device.memory_bytes == 40 * 2**30
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "a100"\nflops = 1\n')
    assert main(["plan", "--device", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown field(s) flops" in err[0]
    assert main(["plan", "--device", "tpu"]) == 2


@pytest.mark.multiprocess
def test_plan_then_train_end_to_end(tmp_path: Path, corpus: Path) -> None:
    model_file = tmp_path / "tiny.toml"
    model_file.write_text("[model]\nvocab_size = 320\nn_layers = 2\nd_model = 32\nn_heads = 2\n"
                          "max_seq_len = 16\n")
    out = tmp_path / "plan.toml"
    assert main(["plan", "--model", str(model_file), "--gpus", "2", "--batch", "8",
                 "--out", str(out)]) == 0
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(out), "--data", str(corpus), "--steps", "1",
                 "--val-fraction", "0", "--checkpoint-every", "0", "--run-dir", str(runs),
                 "--name", "planned"]) == 0
    config = json.loads((runs / "planned" / "config.json").read_text())
    written = build_run_config(build_parser().parse_args(["train", "--config", str(out)]))
    assert config["parallel"] == json.loads(json.dumps(written.to_dict()["parallel"]))


def test_recompute_flag_and_file_take_the_three_modes(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def parsed(*argv: str):
        return build_run_config(build_parser().parse_args(["train", *argv])).parallel.recompute

    assert parsed("--recompute", "selective") == "selective"
    assert parsed("--recompute") is True and parsed("--recompute", "none") is False
    cfg = tmp_path / "r.toml"
    cfg.write_text('[parallel]\nrecompute = "full"\n')
    assert parsed("--config", str(cfg)) is True
    cfg.write_text('[parallel]\nrecompute = "some"\n')
    assert main(["train", "--config", str(cfg)]) == 2
    assert "recompute='some' is unknown" in capsys.readouterr().err


def test_profiled_plan_times_the_finalists_here() -> None:
    runtime = profiling_runtime()
    p = plan(TINY, Cluster.build("cpu", 2), global_batch=8, seq_len=16, profile=runtime,
             finalists=4)
    assert p.best.simulated and p.best.step_s > 0
    # the profiler runs the runtime's stage runner: selective recomputation included
    c = Candidate(tp=2, pp=2, dp=1, schedule="zb-h1", virtual_stages=1, microbatch_size=2,
                  microbatches=4, recompute="selective")
    assert simulate_candidate(TINY, c, Cluster.build("cpu", 4), 16, 8, profile=runtime).step_s > 0
    with pytest.raises(ConfigError, match="--device cpu"):
        plan(TINY, Cluster.build("a100", 2), global_batch=8, seq_len=16, profile=runtime)


def test_an_imported_models_special_ids_round_trip_through_the_toml(tmp_path: Path) -> None:
    ids = {"pad": 0, "cls": 101, "sep": 102, "mask": 103}
    model = dataclasses.replace(TINY, family="bert", special_ids=ids)
    p = plan(model, Cluster.build("cpu", 2), global_batch=8, seq_len=16)
    out = tmp_path / "plan.toml"
    out.write_text(to_toml(p))
    run = build_run_config(build_parser().parse_args(["train", "--config", str(out)]))
    assert run.model.special_ids == ids and run.model == p.model
