"""The simulator's tensor- and data-parallel model: collectives per layer, links, dp overlap."""

from __future__ import annotations

import dataclasses

import pytest

from conveyor.cli import main
from conveyor.config import ModelConfig
from conveyor.parallel.partition import uniform
from conveyor.schedules import build_schedule
from conveyor.sim import analytic_costs, get_device, simulate
from conveyor.sim.comm import (
    Collective,
    Link,
    MeshLinks,
    collective_time,
    dp_grad_collectives,
    layer_collectives,
)

CFG = ModelConfig(vocab_size=512, n_layers=4, d_model=64, n_heads=4, max_seq_len=32)
TOKENS, D = 2 * 32, 64


def test_a_block_has_two_all_reduces_each_way_without_sp_and_gather_scatter_pairs_with() -> None:
    fwd, bwd = layer_collectives(TOKENS, D, sequence_parallel=False, dtype_bytes=2)
    assert [c.op for c in fwd] == [c.op for c in bwd] == ["all-reduce"] * 2
    assert all(c.nbytes == TOKENS * D * 2 for c in fwd + bwd)
    fwd, bwd = layer_collectives(TOKENS, D, sequence_parallel=True, dtype_bytes=2)
    for ops in (fwd, bwd):
        assert sorted(c.op for c in ops) == ["all-gather"] * 2 + ["reduce-scatter"] * 2
    # an all-gather plus a reduce-scatter move what one all-reduce moves
    link = Link(100e9, 0.0)
    ar = collective_time(Collective("all-reduce", 1e6), 4, link)
    pair = sum(collective_time(Collective(op, 1e6), 4, link)
               for op in ("all-gather", "reduce-scatter"))
    assert ar == pytest.approx(pair)


def test_ring_collective_time_formula() -> None:
    link = Link(bandwidth_Bps=10e9, latency_s=5e-6)
    n, size = 8, 64e6
    assert collective_time(Collective("all-reduce", size), n, link) == pytest.approx(
        2 * (n - 1) * (5e-6 + size / n / 10e9))
    assert collective_time(Collective("all-gather", size), n, link) == pytest.approx(
        (n - 1) * (5e-6 + size / n / 10e9))
    assert collective_time(Collective("all-reduce", size), 1, link) == 0.0


def test_links_per_axis_follow_tp_innermost() -> None:
    intra, inter = Link(300e9, 1e-5), Link(25e9, 5e-6)
    kw = {"gpus_per_node": 8, "intra": intra, "inter": inter}
    links = MeshLinks.build(tp=8, dp=4, pp=2, **kw)
    assert (links.tp, links.dp, links.pp) == (intra, inter, inter)
    links = MeshLinks.build(tp=2, dp=4, pp=1, **kw)
    assert (links.tp, links.dp) == (intra, intra)
    assert MeshLinks.build(tp=16, dp=1, pp=1, **kw).tp == inter


def test_counted_tp_seconds_per_stage_match_the_formula() -> None:
    # element-wise traffic off: what tp does not split (norms, residuals) would blur the halving
    dev = dataclasses.replace(get_device("a100"), gpus_per_node=8, elementwise_passes=0.0)
    part = uniform(CFG.num_blocks, 3)  # [emb, l1, l2] [l3] [l4, head]
    one = analytic_costs(CFG, part, microbatch_size=2, seq_len=32, device=dev)
    two = analytic_costs(CFG, part, microbatch_size=2, seq_len=32, device=dev, tp=2)
    per_ar = collective_time(Collective("all-reduce", TOKENS * D * 2), 2, dev.intra)
    assert two.tp_f_s[1] == pytest.approx(2 * per_ar)  # one layer: two all-reduces each way
    assert two.tp_b_s[1] == pytest.approx(2 * per_ar)
    # the embedding's lookup is all-reduced too
    assert two.tp_f_s[0] == pytest.approx(5 * per_ar) and two.tp_b_s[0] == pytest.approx(4 * per_ar)
    for s in range(3):
        # compute halves; what tp adds is its collectives
        assert two.f[s] - two.tp_f_s[s] == pytest.approx(one.f[s] / 2)
        assert two.b[s] - two.tp_b_s[s] == pytest.approx(one.b[s] / 2)
    assert two.activation_bytes[1] < one.activation_bytes[1]


def test_tp2_prediction_on_cpu_is_sane() -> None:
    part = uniform(CFG.num_blocks, 2)
    sched = build_schedule("1f1b", 2, 4)
    one = simulate(sched, analytic_costs(CFG, part, microbatch_size=2, seq_len=32))
    two = simulate(sched, analytic_costs(CFG, part, microbatch_size=2, seq_len=32, tp=2))
    # half the FLOPs per rank plus gloo's collectives, which for a model this small
    # (latency-bound: ~0.2 ms per all-reduce) cost more than the FLOPs saved
    serial = sum(two.tp_seconds(r) for r in two.timeline)
    assert one.step_time / 2 < two.step_time <= one.step_time / 2 + serial
    assert two.tp_seconds(0) == pytest.approx(sum(
        4 * (two.cost.tp_f_s[0] + two.cost.tp_b_s[0]) for _ in range(1)))
    assert 0 < two.comm_share < 1 and one.comm_share == 0
    assert max(two.peak_activation_bytes.values()) < max(one.peak_activation_bytes.values())


def test_dp_reduction_overlaps_the_last_backward() -> None:
    dev = get_device("a100")
    big = ModelConfig(vocab_size=512, n_layers=8, d_model=1024, n_heads=8, max_seq_len=1024)
    part = uniform(big.num_blocks, 2)
    sched = build_schedule("1f1b", 2, 4)

    def run(bucket_mb: float) -> object:
        cost = analytic_costs(big, part, microbatch_size=8, seq_len=1024, device=dev, dp=8,
                              dp_bucket_mb=bucket_mb)
        return cost, simulate(sched, cost)

    one_cost, one = run(0.0)  # a single bucket per stage: it starts after the last backward
    many_cost, many = run(8.0)
    assert many_cost.dp_buckets[0] > 1 and one_cost.dp_buckets == (1, 1)
    total = max(one_cost.dp_reduce_s)
    assert one.pipeline_time == pytest.approx(many.pipeline_time)
    assert one.dp_exposed == pytest.approx(total, rel=0.02)
    assert 0 < many.dp_exposed < 0.5 * one.dp_exposed  # most buckets hide under backward
    assert many.step_time == pytest.approx(many.pipeline_time + many.dp_exposed)


def test_dp_grad_buckets_and_zero() -> None:
    buckets, after = dp_grad_collectives(10.0, bucket_bytes=4.0, zero=0, param_bytes=5.0)
    assert [(c.nbytes, k) for c, k in buckets] == [(4.0, 2), (2.0, 1)] and after == ()
    buckets, after = dp_grad_collectives(10.0, bucket_bytes=0, zero=1, param_bytes=5.0)
    assert [(c.op, k) for c, k in buckets] == [("reduce-scatter", 1)]
    assert after[0].op == "all-gather"


def test_simulate_cli_predicts_3d(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--model", "demo", "--tp", "2", "--dp", "2", "--pp", "2",
               "--sequence-parallel", "--microbatches", "4", "--seq-len", "32",
               "--out", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "tensor-parallel collectives" in out and "tp=2 dp=2" in out
