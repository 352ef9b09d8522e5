"""`conveyor plan --profile` on this machine: measured collectives, ranks profiled at once."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conveyor.config import ConfigError, ModelConfig
from conveyor.parallel.layout import resolve_layout
from conveyor.plan import Candidate, Cluster, load_device, profiled_costs, simulate_candidate
from conveyor.plan.estimate import costs, step_end_seconds
from conveyor.runtime.launch import launch
from conveyor.runtime.profiling import profiling_runtime
from conveyor.sim import CostError, simulate
from conveyor.sim.comm import Collective, collective_time
from conveyor.sim.gloo import CommCalibration, Fit, calibrate, fit_line

TINY = ModelConfig(vocab_size=320, n_layers=4, d_model=32, n_heads=2, max_seq_len=16)
TIED = replace(TINY, tie_embeddings=True)
FITS = {"all-reduce": Fit(300e-6, 1.5e9), "all-gather": Fit(200e-6, 2e9),
        "reduce-scatter": Fit(400e-6, 1e9), "send-recv": Fit(40e-6, 3e9),
        "bucket-copy": Fit(50e-6, 5e9)}


def test_fit_line_recovers_latency_and_bandwidth() -> None:
    fit = fit_line([(s, 2e-4 + s / 1e9) for s in (4096, 65536, 1 << 20, 4 << 20)])
    assert fit.latency_s == pytest.approx(2e-4) and fit.bandwidth_Bps == pytest.approx(1e9)
    # a negative intercept is no latency: refitted through the origin
    assert fit_line([(1000, 0.0), (2000, 2e-6), (3000, 4e-6)]).latency_s == 0.0
    with pytest.raises(CostError, match="at least 2"):
        fit_line([(1, 1.0)])


def test_ring_model_reproduces_each_fit_on_two_ranks() -> None:
    cal = CommCalibration(FITS, {})
    dev = replace(Cluster.build("cpu", 2).device, collectives=cal.ring_ops())
    for op in ("all-reduce", "all-gather", "reduce-scatter"):
        for size in (4096.0, 1e6):
            assert collective_time(Collective(op, size), 2, dev.intra) == pytest.approx(
                cal.seconds(op, size))  # type: ignore[arg-type]
    # on 4 ranks the ring takes 3x the steps of half the bytes each: more than on 2
    assert collective_time(Collective("all-reduce", 1e6), 4, dev.intra) > cal.seconds(
        "all-reduce", 1e6)


def test_calibration_in_a_device_file(tmp_path: Path) -> None:
    table = CommCalibration(FITS, {}).to_dict()["collectives"]
    path = tmp_path / "here.json"
    path.write_text(json.dumps({"base": "cpu", "collectives": table}))
    dev = load_device(str(path))
    assert dict((op, lat) for op, lat, _ in dev.collectives)["all-reduce"] == pytest.approx(150e-6)
    assert dev.copy_bandwidth_Bps == 5e9
    path.write_text(json.dumps({"base": "cpu", "collectives": {"all-reduce": {"latency": 1}}}))
    with pytest.raises(ConfigError, match="latency_s, bandwidth_Bps"):
        load_device(str(path))


def test_step_end_reductions_are_in_the_step() -> None:
    cluster = Cluster.build("cpu", 2).calibrated(CommCalibration(FITS, {}))
    one = Candidate(tp=1, pp=2, dp=1, schedule="1f1b", virtual_stages=1, microbatch_size=2,
                    microbatches=4)
    assert step_end_seconds(TINY, one, cluster) == pytest.approx(FITS["all-reduce"].seconds(4))
    tied = step_end_seconds(TIED, one, cluster)
    # the tied table's fp32 grad (320 x 32) across the pipeline, plus the loss over pp
    assert tied == pytest.approx(FITS["all-reduce"].seconds(320 * 32 * 4)
                                 + FITS["all-reduce"].seconds(4))
    # ZB-V holds embedding and head on one rank: only the loss is reduced
    v = replace(one, schedule="zb-v", virtual_stages=2)
    assert step_end_seconds(TIED, v, cluster) == pytest.approx(FITS["all-reduce"].seconds(4))
    cost = costs(TIED, one, cluster, 16)
    assert cost.step_end_s == tied
    lay = resolve_layout(TIED, one.parallel_config(), batch_size=8, seq_len=16)
    res = simulate(lay.schedule, cost)
    assert res.step_time == pytest.approx(res.pipeline_time + tied) and res.dp_exposed == 0
    # data parallelism: each bucket is also copied in and out
    dp = Candidate(tp=1, pp=1, dp=2, schedule="1f1b", virtual_stages=1, microbatch_size=4,
                   microbatches=1)
    slow = costs(TINY, dp, cluster, 16).dp_reduce_s[0]
    free = costs(TINY, dp, Cluster(replace(cluster.device, copy_bandwidth_Bps=float("inf")), 2),
                 16).dp_reduce_s[0]
    assert slow > free


@pytest.mark.multiprocess
def test_calibrate_measures_caches_and_reuses(tmp_path: Path) -> None:
    path = tmp_path / "gloo.json"
    cal = calibrate(path, launch=launch, sizes=(4096, 65536), repeats=2)
    assert set(cal.fits) == {"all-reduce", "all-gather", "reduce-scatter", "send-recv",
                             "bucket-copy"}
    assert all(f.bandwidth_Bps > 0 and f.latency_s >= 0 for f in cal.fits.values())
    assert [b for b, _ in cal.medians["all-reduce"]] == [4096, 65536]
    again = calibrate(path, launch=launch)  # read back, not measured
    assert again.fits == cal.fits
    path.write_text("{")
    with pytest.raises(CostError, match="delete it"):
        calibrate(path, launch=launch)


@pytest.mark.multiprocess
def test_profiled_costs_time_every_rank_at_once() -> None:
    """pp layouts are timed together and alone (blended), tp ones on their shards."""
    cluster = Cluster.build("cpu", 2).calibrated(CommCalibration(FITS, {}))
    pipe = Candidate(tp=1, pp=2, dp=1, schedule="1f1b", virtual_stages=1, microbatch_size=2,
                     microbatches=4, partition="uniform")
    tp = Candidate(tp=2, pp=1, dp=1, schedule="1f1b", virtual_stages=1, microbatch_size=4,
                   microbatches=2, sequence_parallel=True)
    got = profiled_costs(TINY, [pipe, tp], cluster, 16, 8, runtime=profiling_runtime())
    assert "alone and together" in got[0].source and "alone" not in got[1].source
    assert all(x > 0 for k in got for x in (*k.f, *k.b, *k.w))
    # the tp share reported is the collective model's, never more than the measured F
    assert got[1].tp_f_s and all(t <= f for t, f in zip(got[1].tp_f_s, got[1].f, strict=True))
    # SP sums the norms' grads over tp once per step: more to reduce than the loss alone
    assert got[1].step_end_s > step_end_seconds(TINY, tp, cluster)
    est = simulate_candidate(TINY, tp, cluster, 16, 8, cost=got[1])
    assert est.simulated and est.step_s > 0 and est.tp_s > 0


def test_overlap_is_the_share_of_compute_the_other_ranks_share() -> None:
    from conveyor.plan.estimate import _overlap
    from conveyor.schedules import Action, Kind
    from conveyor.schedules.validate import TimedAction

    def row(rank: int, stage: int, spans: list[tuple[float, float]]) -> list[TimedAction]:
        return [TimedAction(rank, Action(stage, Kind.F, m), b, e, b)
                for m, (b, e) in enumerate(spans)]

    # m = 1: the two ranks take turns, nothing overlaps
    assert _overlap({0: row(0, 0, [(0, 1), (3, 4)]), 1: row(1, 1, [(1, 3)])}) == {0: 0.0, 1: 0.0}
    # rank 1 computes during half of rank 0's work, all of its own is shared
    assert _overlap({0: row(0, 0, [(0, 2), (2, 4)]), 1: row(1, 1, [(1, 3)])}) == {0: 0.5, 1: 1.0}


@pytest.mark.multiprocess
def test_cli_profile_reuses_the_cached_calibration(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from conveyor.cli import main

    model = tmp_path / "tiny.toml"
    model.write_text("[model]\nvocab_size = 320\nn_layers = 2\nd_model = 32\nn_heads = 2\n"
                     "max_seq_len = 16\n")
    cache = tmp_path / "gloo.json"
    cache.write_text(json.dumps(CommCalibration(FITS, {}).to_dict()))
    assert main(["plan", "--model", str(model), "--gpus", "2", "--batch", "4", "--profile",
                 "--calibration", str(cache), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"measured ({cache}): all-reduce 300 us + 1.50 GB/s" in out and "why:" in out
    cache.write_text("[]")
    assert main(["plan", "--model", str(model), "--gpus", "2", "--profile",
                 "--calibration", str(cache)]) == 2
    assert "calibration" in capsys.readouterr().err


def test_profile_batches_hold_what_fits_in_memory() -> None:
    from conveyor.config import ParallelConfig
    from conveyor.sim.group_profile import Job, _batches

    lay = resolve_layout(TINY, ParallelConfig(pp=2), batch_size=8, seq_len=16)
    assert [len(b) for b in _batches(TINY, [Job(lay, 4, 16)] * 5, 2)] == [5]
    huge = replace(TINY, d_model=16384, n_heads=16, vocab_size=50000)  # ~13B parameters
    assert [len(b) for b in _batches(huge, [Job(lay, 4, 16)] * 3, 2)] == [1, 1, 1]
