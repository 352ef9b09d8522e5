"""The simulator: cost models, step simulation, memory walk, traces and Gantt charts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.models import block_param_counts, build_blocks
from conveyor.parallel.partition import uniform
from conveyor.runtime.stage import StageRunner
from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    Kind,
    Placement,
    Schedule,
    build_schedule,
    forward_only,
    gpipe,
    one_f_one_b,
    overlap,
    validate,
    zb_h1,
)
from conveyor.schedules.ir import Action, B, F, I, W
from conveyor.schedules.validate import TimedAction
from conveyor.sim import (
    CostError,
    CostModel,
    analytic_costs,
    chrome_trace,
    profile_costs,
    render_comparison,
    render_gantt,
    simulate,
    write_chrome_trace,
)
from conveyor.sim.render import timeline_stats, wait_slices

SIZES = [(1, 1), (2, 1), (2, 4), (3, 4), (4, 8), (5, 3)]
TINY = ModelConfig(vocab_size=128, n_layers=2, d_model=64, n_heads=2, max_seq_len=16)


def _split_1f1b(p: int, m: int, defer_w: bool) -> Schedule:
    """1F1B with split backward: each B becomes an I, its W right after it or all W at the end."""
    base = one_f_one_b(p, m)
    actions: dict[int, list[Action]] = {}
    for r, acts in base.actions.items():
        row: list[Action] = []
        for a in acts:
            if a.kind is not Kind.B:
                row.append(a)
                continue
            row.append(I(a.stage, a.microbatch))
            if not defer_w:
                row.append(W(a.stage, a.microbatch))
        if defer_w:
            row += [W(r, i) for i in range(m)]
        actions[r] = row
    return Schedule.build("1f1b-split", m, base.placement, actions)


@pytest.mark.parametrize("p,m", SIZES)
@pytest.mark.parametrize("name", ["zb-h1", "zb-h2", "zb-v"])
def test_unit_costs_reproduce_validator_split(name: str, p: int, m: int) -> None:
    sched = build_schedule(name, p, m, SCHEDULE_CHUNKS[name])
    stats = validate(sched)  # F = I = W = 1
    result = simulate(sched, CostModel.uniform(sched.num_stages, w=1.0))
    assert result.step_time == pytest.approx(stats.makespan)
    assert result.bubble_fraction == pytest.approx(stats.bubble_fraction)


@pytest.mark.parametrize("p,m", SIZES)
@pytest.mark.parametrize("build", [gpipe, one_f_one_b])
def test_unit_costs_reproduce_validator(build, p: int, m: int) -> None:
    sched = build(p, m)
    stats = validate(sched)
    result = simulate(sched, CostModel.uniform(p))
    assert result.step_time == pytest.approx(stats.makespan)
    assert result.bubble_fraction == pytest.approx(stats.bubble_fraction)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_step_time_grows_with_latency() -> None:
    sched = one_f_one_b(4, 6)
    times = [
        simulate(sched, CostModel.uniform(4, latency_s=lat)).step_time for lat in (0, 0.1, 0.5)
    ]
    assert times[0] < times[1] < times[2]
    # 2 * (p - 1) hops lie on the critical path of the first microbatch alone
    assert times[2] - times[0] >= 2 * 3 * 0.5 - 1e-9


def test_lent_cores_speed_up_the_actions_that_run_alone() -> None:
    """1F1B lends 0F0 and 0B3, GPipe its turn too: each runs ``thread_speedup[1]`` times faster."""
    for build, saved in ((one_f_one_b, 0.5 + 1.0), (gpipe, 2 * (0.5 + 1.0))):
        sched = build(2, 4)
        cost = CostModel.uniform(2, f=1.0, b=2.0)
        own = simulate(sched, cost).step_time
        lent = simulate(sched, dataclasses.replace(cost, thread_speedup=(1.0, 2.0)))
        assert own == 15.0 and lent.step_time == pytest.approx(own - saved)
    with pytest.raises(CostError, match="the first 1.0"):
        dataclasses.replace(CostModel.uniform(2), thread_speedup=(2.0, 3.0))


def test_bandwidth_adds_to_transfer_time() -> None:
    cost = CostModel.uniform(2, latency_s=1e-3)
    slow = CostModel(**{**cost.to_dict(), "bandwidth_Bps": 1e6, "message_bytes": 2000})
    assert slow.transfer_time() == pytest.approx(1e-3 + 2e-3)
    assert cost.transfer_time() == pytest.approx(1e-3)


def test_unsplit_backward_costs_b_plus_w() -> None:
    cost = CostModel.uniform(2, f=1.0, b=1.0, w=0.5)
    whole = simulate(one_f_one_b(2, 3), cost)
    split = simulate(_split_1f1b(2, 3, defer_w=False), cost)
    assert whole.execution.busy(0) == pytest.approx(3 * 2.5)
    assert split.execution.busy(0) == pytest.approx(3 * 2.5)
    assert any(t.action.kind is Kind.W for t in split.timeline[0])


def _durations(sim, rank: int) -> dict[str, float]:
    return {str(t.action): t.end - t.start for t in sim.timeline[rank] if t.action.kind.is_compute}


def test_each_kind_costs_its_own_work() -> None:
    # B is a full backward (full_b when measured), I the input-grad, W the weight-grad;
    # one schedule may mix them: stage 0 splits microbatch 0 and runs microbatch 1 whole
    base = CostModel.uniform(2, f=1.0, b=2.0, w=0.5).to_dict()
    cost = CostModel.from_dict({**base, "full_b": [3.0, 4.0]})
    mixed = Schedule.build("mixed", 2, Placement.looped(2), {
        0: [F(0, 0), F(0, 1), I(0, 0), B(0, 1), W(0, 0)],
        1: [F(1, 0), B(1, 0), F(1, 1), I(1, 1), W(1, 1)],
    })
    sim = simulate(mixed, cost)
    assert _durations(sim, 0) == {"0F0": 1.0, "0F1": 1.0, "0I0": 2.0, "0B1": 3.0, "0W0": 0.5}
    assert _durations(sim, 1) == {"1F0": 1.0, "1B0": 4.0, "1F1": 1.0, "1I1": 2.0, "1W1": 0.5}
    assert cost.duration(1, Kind.B) == 4.0 and CostModel.uniform(1, b=2.0, w=0.5).duration(0, Kind.B) == 2.5
    with pytest.raises(CostError, match="communication"):
        cost.duration(0, Kind.SEND_F)


def test_overlapped_pair_costs_both_parts() -> None:
    acts = {
        0: [F(0, 0), F(0, 1), B(0, 0), B(0, 1)],
        1: [F(1, 0), overlap(F(1, 1), B(1, 0)), B(1, 1)],
    }
    sched = Schedule.build("pair", 2, Placement.looped(2), acts)
    sim = simulate(sched, CostModel.uniform(2, f=1.0, b=2.0, w=0.5))
    assert _durations(sim, 1)["(1F1;1B0)OVERLAP_F_B"] == pytest.approx(1.0 + 2.5)
    # 1F1's activations exist before 1B0 frees its own: two held at the pair
    assert sim.peak_activation_bytes == {0: 2, 1: 2}
    # the pair waits for 0F1 and its SEND_B leaves after it: 0B0 starts when it ends
    pair_end = next(t.end for t in sim.timeline[1] if t.action.kind is Kind.OVERLAP_F_B)
    assert next(t.start for t in sim.timeline[0] if str(t.action) == "0B0") == pytest.approx(pair_end)


@pytest.mark.parametrize("name", sorted(SCHEDULE_CHUNKS))
def test_memory_walk_is_the_validators_definition(name: str) -> None:
    # the simulator weighs the validator's held stage-microbatches by activation bytes
    sched = build_schedule(name, 3, 7, SCHEDULE_CHUNKS[name] or 2)
    stats = validate(sched)
    sim = simulate(sched, CostModel.uniform(sched.num_stages, activation_bytes=5))
    assert sim.peak_activation_bytes == {r: 5 * k for r, k in stats.peak_activations.items()}


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8)])
def test_analytic_1f1b_memory_at_most_gpipe(p: int, m: int) -> None:
    cfg = ModelConfig(n_layers=8)
    cost = analytic_costs(
        cfg, uniform(cfg.num_blocks, p), microbatch_size=2, seq_len=64, device="h100"
    )
    g, o = simulate(gpipe(p, m), cost), simulate(one_f_one_b(p, m), cost)
    for r in range(p):
        assert o.peak_memory_bytes[r] <= g.peak_memory_bytes[r]
        assert g.peak_activation_bytes[r] == m * cost.activation_bytes[r]
        assert o.peak_activation_bytes[r] == min(p - r, m) * cost.activation_bytes[r]
        assert g.peak_memory_bytes[r] == g.peak_activation_bytes[r] + cost.static_bytes(r)


def test_split_backward_frees_activations_at_w() -> None:
    cost = CostModel.uniform(2, w=1.0)
    eager = simulate(_split_1f1b(2, 4, defer_w=False), cost)
    deferred = simulate(_split_1f1b(2, 4, defer_w=True), cost)
    assert eager.peak_activation_bytes == {0: 2, 1: 1}
    assert deferred.peak_activation_bytes == {0: 4, 1: 4}  # nothing freed until the Ws
    # ZB-H1 defers each W r steps: min(p, m) held on every rank, not 1F1B's min(p - r, m)
    assert simulate(zb_h1(4, 8), cost_4 := CostModel.uniform(4, w=1.0)).peak_activation_bytes == {
        r: 4 for r in range(4)
    }
    assert simulate(one_f_one_b(4, 8), cost_4).peak_activation_bytes == {0: 4, 1: 3, 2: 2, 3: 1}


def test_forward_only_holds_no_activations() -> None:
    # eval runs without autograd: nothing is kept for a backward (the validator's rule too)
    sim = simulate(forward_only(2, 3), CostModel.uniform(2, activation_bytes=7))
    assert sim.peak_activation_bytes == {0: 0, 1: 0}


def test_analytic_scales_with_layers_and_seq() -> None:
    def cost(n_layers: int, seq: int) -> CostModel:
        cfg = ModelConfig(n_layers=n_layers, max_seq_len=256)
        return analytic_costs(
            cfg, uniform(cfg.num_blocks, 1), microbatch_size=1, seq_len=seq, device="a100"
        )

    base, deep, long = cost(4, 64), cost(8, 64), cost(4, 128)
    assert deep.f[0] > base.f[0] and deep.param_bytes[0] > base.param_bytes[0]
    assert long.f[0] >= 2 * base.f[0]  # linear in tokens, plus quadratic attention
    assert long.activation_bytes[0] == pytest.approx(2 * base.activation_bytes[0], rel=1e-6)
    # backward = 2 x forward's matmuls, split equally; its element-wise work (twice the
    # forward's memory traffic) goes with the input-grad
    assert base.b[0] > base.f[0] > base.w[0]
    flat = analytic_costs(ModelConfig(n_layers=4, max_seq_len=256), uniform(6, 1),
                          microbatch_size=1, seq_len=64, device="cpu")
    assert flat.b == flat.f == flat.w  # the CPU preset folds element-wise work into efficiency
    assert long.message_bytes == 2 * base.message_bytes


def test_analytic_rejects_wrong_partition() -> None:
    with pytest.raises(CostError, match="num_blocks=10"):
        analytic_costs(ModelConfig(), uniform(6, 2), microbatch_size=1, seq_len=8, device="h100")
    with pytest.raises(CostError, match="unknown"):
        analytic_costs(ModelConfig(), uniform(10, 2), microbatch_size=1, seq_len=8, device="tpu")


def test_cost_model_json_round_trip(tmp_path: Path) -> None:
    cost = CostModel.uniform(3, latency_s=0.25)
    assert math.isinf(cost.bandwidth_Bps)
    assert CostModel.load(cost.save(tmp_path / "c.json")) == cost
    json.loads((tmp_path / "c.json").read_text())  # strict JSON: no Infinity
    with pytest.raises(CostError, match="entries"):
        CostModel(**{**cost.to_dict(), "b": [1.0]})
    with pytest.raises(CostError, match="unknown"):
        CostModel.from_dict({**cost.to_dict(), "latency": 1.0})


def test_stage_count_mismatch_is_an_error() -> None:
    with pytest.raises(CostError, match="2 stages but schedule .1f1b. has 3"):
        simulate(one_f_one_b(3, 2), CostModel.uniform(2))


def test_chrome_trace_one_event_per_action(tmp_path: Path) -> None:
    sim = simulate(one_f_one_b(3, 4), CostModel.uniform(3, latency_s=0.5))
    path = write_chrome_trace(
        {"simulated": sim.timeline, "again": sim.timeline}, tmp_path / "t.json"
    )
    events = json.loads(path.read_text())["traceEvents"]
    actions = sum(len(row) for row in sim.timeline.values())
    for pid in (0, 1):
        mine = [e for e in events if e["pid"] == pid]
        slices = [e for e in mine if e["ph"] == "X" and e["cat"] != "wait"]
        assert len(slices) == actions
        assert {e["tid"] for e in slices} == {0, 1, 2}
        assert any(e.get("cat") == "wait" for e in mine)  # latency makes ranks wait on RECVs
    names = {e["name"] for e in events}
    assert {"F3 s1", "B0 s2", "RECV_F0 s1", "process_name"} <= names
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")


def _measured_like() -> dict[int, list[TimedAction]]:
    """Two ranks on an absolute clock, RECVs spanning the time they blocked."""
    t0 = 1000.0
    rows = {
        0: [
            (F(0, 0), 0, 1),
            (Action(0, Kind.SEND_F, 0), 1, 1.1),
            (Action(0, Kind.RECV_B, 0), 1.1, 3.3),
            (B(0, 0), 3.3, 4.3),
        ],
        1: [
            (Action(1, Kind.RECV_F, 0), 0, 1.2),
            (F(1, 0), 1.2, 2.2),
            (B(1, 0), 2.2, 3.2),
            (Action(1, Kind.SEND_B, 0), 3.2, 3.3),
        ],
    }
    return {
        r: [TimedAction(r, a, t0 + s, t0 + e, t0 + s) for a, s, e in row] for r, row in rows.items()
    }


def test_wait_slices_of_measured_timeline() -> None:
    timeline = _measured_like()
    waits = wait_slices(timeline)
    assert [(round(b - 1000, 6), round(e - 1000, 6)) for b, e, _ in waits[0]] == [(1.1, 3.3)]
    assert [(round(b - 1000, 6), round(e - 1000, 6)) for b, e, _ in waits[1]] == [(0.0, 1.2)]
    step, bubble = timeline_stats(timeline)
    assert step == pytest.approx(4.3)
    assert bubble == pytest.approx(1 - 4.0 / (2 * 4.3))
    assert chrome_trace({"measured": timeline})["traceEvents"][3]["ts"] == pytest.approx(0.0)


def test_png_written(tmp_path: Path) -> None:
    sim = simulate(_split_1f1b(3, 6, defer_w=True), CostModel.uniform(3, w=0.5, latency_s=0.1))
    for path in (
        render_gantt(sim.timeline, tmp_path / "g.png"),
        render_comparison(_measured_like(), sim.timeline, tmp_path / "c.png", title="test"),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_png_and_trace_draw_input_grads_and_pairs(tmp_path: Path) -> None:
    from conveyor.sim.render import _COLOURS

    assert len({_COLOURS[k] for k in ("F", "B", "I", "W")}) == 4
    # torch's DualPipeV order for 2 ranks, 4 microbatches: F, B, I, W and overlapped pairs
    rows = {
        0: "0F0 0F1 0F2 3F0 3I0 3W0 3F1 (0F3;3B1)OVERLAP_F_B (3F2;0B0)OVERLAP_F_B 3B2 "
           "(3F3;0B1)OVERLAP_F_B 3B3 0I2 0W2 0I3 0W3",
        1: "1F0 2F0 1F1 2F1 1F2 2B0 (2F2;1B0)OVERLAP_F_B (1F3;2B1)OVERLAP_F_B "
           "(2F3;1B1)OVERLAP_F_B 2B2 1B2 2I3 1I3 2W3 1W3",
    }
    acts = {r: [Action.parse(x) for x in row.split()] for r, row in rows.items()}
    sched = Schedule.build("v-pairs", 4, Placement.vshape(2), acts)
    validate(sched)
    sim = simulate(sched, CostModel.uniform(4, w=0.5, latency_s=0.1))
    data = render_gantt(sim.timeline, tmp_path / "pairs.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    events = chrome_trace({"sim": sim.timeline})["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {"I0 s3", "W0 s3", "B0 s2", "F3 s0+B1 s3", "F2 s2+B0 s1"} <= names
    pair = next(e for e in events if e["name"] == "F3 s0+B1 s3")
    assert pair["args"]["parts"] == ["0F3", "3B1"] and pair["args"]["kind"] == "OVERLAP_F_B"


def test_table_has_a_row_per_rank() -> None:
    lines = simulate(gpipe(3, 2), CostModel.uniform(3)).table().splitlines()
    assert len(lines) == 2 + 3 and "bubble 50.0%" in lines[0]


def test_profile_tiny_model() -> None:
    part = uniform(TINY.num_blocks, 2)
    cost = profile_costs(TINY, part, microbatch_size=4, seq_len=16, warmup=1, repeats=3,
                         runner=StageRunner)
    assert cost.num_stages == 2
    assert all(x > 0 for x in cost.f + cost.b + cost.w)
    assert all(x > 0 for x in cost.activation_bytes)
    counts = block_param_counts(TINY)
    assert list(cost.param_bytes) == [4 * sum(counts[a:b]) for a, b in part.bounds]
    assert cost.message_bytes == 4 * 16 * TINY.d_model * 4
    assert simulate(one_f_one_b(2, 4), cost).step_time > 0


def test_placement_with_two_chunks_per_rank() -> None:
    # V placement: stages 1 and 2 share rank 1 and hand over locally, with no RECV
    place = Placement.vshape(2)
    acts = {
        0: [F(0, 0), F(3, 0), B(3, 0), B(0, 0)],
        1: [F(1, 0), F(2, 0), B(2, 0), B(1, 0)],
    }
    sim = simulate(Schedule.build("v", 1, place, acts), CostModel.uniform(4))
    assert sim.step_time == pytest.approx(8.0)
    assert sim.peak_activation_bytes == {0: 2, 1: 2}


def _with(cost: CostModel, **fields: float) -> CostModel:
    return CostModel.from_dict({**cost.to_dict(), **fields})


def test_executor_work_is_idle_and_messages_leave_when_posted() -> None:
    # lowered gpipe(2, 1): rank 0 [0F0, SEND_F0, RECV_B0, 0B0], rank 1 [RECV_F0, 1F0, 1B0,
    # SEND_B0]; rank 0 posts RECV_B0 before 0F0 (a head: nothing to wait for first)
    cost = _with(CostModel.uniform(2, f=1.0, b=2.0), send_overhead_s=0.1,
                 recv_overhead_s=0.05, action_overhead_s=0.01, latency_s=0.2)
    sim = simulate(gpipe(2, 1), cost)
    spans = {str(t.action): (t.start, t.end) for row in sim.timeline.values() for t in row}
    assert spans["0F0"] == pytest.approx((0.06, 1.06))
    # the send is posted (0.1), then 0B0's bookkeeping (0.01) follows; the message left
    # at 1.16 and arrives 0.2 later
    assert spans["0SEND_F0"] == pytest.approx((1.06, 1.16))
    assert spans["1F0"] == pytest.approx((1.36, 2.36))
    assert spans["1B0"] == pytest.approx((2.37, 4.37))
    assert spans["0B0"] == pytest.approx((4.67, 6.67))
    assert sim.step_time == pytest.approx(6.67)
    # executor work is idle time: busy is the compute alone
    assert sim.execution.busy(0) == pytest.approx(3.0)
    assert sim.execution.busy(1) == pytest.approx(3.0)


def test_pair_waits_for_its_backward_input_after_its_forward() -> None:
    # the executor runs 0F1, then waits for 1B0's grad, then 0B0 (run_in_order)
    acts = {
        0: [F(0, 0), overlap(F(0, 1), B(0, 0)), B(0, 1)],
        1: [F(1, 0), B(1, 0), F(1, 1), B(1, 1)],
    }
    sched = Schedule.build("pair-wait", 2, Placement.looped(2), acts)
    validate(sched)
    sim = simulate(sched, CostModel.uniform(2))
    pair = next(t for t in sim.timeline[0] if t.action.kind is Kind.OVERLAP_F_B)
    # 0F1 ran in 1..2 while 1B0 ran; 0B0 in 3..4: the pair is busy 2, ends at 4
    assert (pair.start, pair.end) == pytest.approx((2.0, 4.0))
    assert sim.step_time == pytest.approx(7.0)  # waiting for both first would give 8
    assert sim.execution.busy(0) == pytest.approx(4.0)


def test_message_and_step_start_costs_are_busy() -> None:
    cost = _with(CostModel.uniform(2), message_compute_s=0.1, step_start_s=0.5)
    sim = simulate(gpipe(2, 1), cost)
    d = _durations(sim, 0) | _durations(sim, 1)
    # first actions +0.5; 1F0 consumes a message; 0B0 sent one (F0) and consumes one
    assert d == pytest.approx({"0F0": 1.5, "0B0": 1.2, "1F0": 1.6, "1B0": 1.0})
    assert sim.step_time == pytest.approx(5.3)


def test_profile_replays_the_runtime_stage_runner() -> None:
    from conveyor.config import ParallelConfig
    from conveyor.parallel.layout import resolve_layout
    built: list[tuple[int, bool]] = []

    def runner(stage: int, blocks: dict, **kw: object) -> StageRunner:
        built.append((stage, bool(kw["split_backward"])))
        return StageRunner(stage, blocks, **kw)  # type: ignore[arg-type]

    layout = resolve_layout(TINY, ParallelConfig(pp=2, schedule="zb-h1", microbatches=2),
                            batch_size=8)
    cost = profile_costs(TINY, layout, microbatch_size=4, seq_len=16, warmup=1, repeats=1,
                         runner=runner)
    # the runtime's runners, split where the schedule has I actions, for both stages;
    # B (never run by zb-h1) timed alone on split runners
    assert {(0, True), (1, True)} <= set(built) and all(split for _, split in built)
    assert all(x > 0 for x in cost.f + cost.b + cost.w + (cost.full_b or ()))
    assert cost.message_compute_s > 0 and cost.send_overhead_s > cost.recv_overhead_s > 0
    # activation bytes are what the runtime's own meter counts for a stashed microbatch
    tokens = torch.randint(TINY.vocab_size, (4, 16))
    meter_bytes = []
    for s, inputs, targets in ((0, tokens, None),
                               (1, {"hidden": torch.randn(4, 16, TINY.d_model)}, tokens)):
        idx = list(layout.partition.blocks_of(s))
        r = StageRunner(s, dict(zip(idx, build_blocks(TINY, 0, idx), strict=True)),
                        num_microbatches=2, split_backward=True)
        r.forward(0, inputs, targets)
        meter_bytes.append(r.meter.live_by["stash"])
    assert list(cost.activation_bytes) == meter_bytes
    assert simulate(layout.schedule, cost).step_time > 0


def test_block_profile_times_every_block_and_weighs_a_large_head() -> None:
    from conveyor.sim.block_profile import profile_block_costs

    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=4096, max_seq_len=16)
    costs = profile_block_costs(cfg, microbatch_size=2, seq_len=16, reps=2)
    assert len(costs) == cfg.num_blocks and all(c > 0 for c in costs)
    # a 4096-way softmax over 32 hidden units outweighs a 32-wide layer
    assert costs[-1] > costs[1]
    with pytest.raises(ValueError, match="seq_len=17"):
        profile_block_costs(cfg, microbatch_size=1, seq_len=17)
