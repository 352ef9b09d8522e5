"""Layout: one resolver decides schedule, chunks, partition and microbatches."""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest

from conveyor.config import PARTITIONS, ConfigError, ModelConfig, ParallelConfig
from conveyor.parallel.layout import (
    PARTITIONERS,
    Layout,
    analytic_block_costs,
    resolve_layout,
    resolve_partition,
    resolve_schedule,
)
from conveyor.parallel.partition import Partition
from conveyor.schedules import Placement, Schedule, ScheduleError, write_schedule_csv

# The model: the head's vocab projection (2*T*D*V) weighs about 2.6 layers.
HEAVY_HEAD = ModelConfig(vocab_size=8192, d_model=256, n_layers=8, n_heads=4, max_seq_len=128)
SMALL = ModelConfig(vocab_size=256, d_model=32, n_layers=6, n_heads=2, max_seq_len=16)


def test_same_inputs_same_layout() -> None:
    par = ParallelConfig(pp=2, microbatches=4, partition="cost")
    a = resolve_layout(HEAVY_HEAD, par, batch_size=8)
    b = resolve_layout(HEAVY_HEAD, par, batch_size=8)
    assert a == b and str(a) == str(b)
    assert pickle.loads(pickle.dumps(a)) == a  # travels to spawned ranks as it is
    assert resolve_layout(HEAVY_HEAD, ParallelConfig(pp=2, microbatches=4)) != a


def test_cost_puts_fewer_blocks_on_the_heavy_head_stage() -> None:
    uni = resolve_layout(HEAVY_HEAD, ParallelConfig(pp=2, partition="uniform"))
    cost = resolve_layout(HEAVY_HEAD, ParallelConfig(pp=2, partition="cost"))
    assert uni.partition == Partition(((0, 5), (5, 10)))
    assert cost.partition == Partition(((0, 6), (6, 10)))  # 6/4 blocks, as the issue measured
    assert cost.imbalance() < uni.imbalance()
    assert cost.imbalance() == pytest.approx(1.053, abs=1e-3)
    assert sum(cost.stage_shares()) == pytest.approx(1.0)


def test_cost_partition_follows_given_block_costs() -> None:
    par = ParallelConfig(pp=2, partition="cost")
    costs = [0.0, 1, 1, 1, 1, 1, 1, 0.0]  # the head costs nothing: an even layer split
    layout = resolve_layout(SMALL, par, block_costs=costs)
    assert layout.partition == Partition(((0, 4), (4, 8)))
    assert layout.cost_source == "given block costs"
    with pytest.raises(ConfigError, match="got 3 block costs for a model of 8 blocks"):
        resolve_layout(SMALL, par, block_costs=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="block cost 1 is -1.0; every block cost must be finite"):
        resolve_layout(SMALL, par, block_costs=[0, -1, 1, 1, 1, 1, 1, 1])


def test_analytic_costs_include_embedding_and_head() -> None:
    costs = analytic_block_costs(HEAVY_HEAD)
    assert len(costs) == HEAVY_HEAD.num_blocks
    assert costs[-1] == 2.0 * 128 * 256 * 8192  # the vocab projection
    assert costs[-1] > 2 * costs[1]


def test_every_configured_partition_has_an_implementation() -> None:
    assert set(PARTITIONERS) == set(PARTITIONS)
    for how in PARTITIONS:
        assert resolve_partition(SMALL, 3, how).num_stages == 3
    with pytest.raises(ConfigError, match="partition='bogus' is unknown; use one of uniform, "
                       "params, cost"):
        ParallelConfig(partition="bogus")


@pytest.mark.parametrize(("schedule", "virtual", "chunks"), [
    ("1f1b", None, 1), ("interleaved-1f1b", None, 2), ("interleaved-1f1b", 3, 3), ("zb-v", None, 2),
])
def test_chunks_are_decided_here(schedule: str, virtual: int | None, chunks: int) -> None:
    par = ParallelConfig(pp=2, schedule=schedule, virtual_stages=virtual)
    layout = resolve_layout(SMALL, par)
    assert layout.virtual_stages == chunks and layout.num_stages == 2 * chunks
    assert layout.partition.num_stages == 2 * chunks
    assert layout.placement == layout.schedule.placement
    assert resolve_schedule(name=schedule, pp=2, microbatches=4, virtual_stages=virtual) \
        == layout.schedule


def test_microbatch_size_and_batch_errors() -> None:
    par = ParallelConfig(pp=2, dp=2, microbatches=2)
    assert resolve_layout(SMALL, par).microbatch_size is None
    layout = resolve_layout(SMALL, par, batch_size=12)
    assert (layout.microbatch_size, layout.microbatches, layout.world_size) == (3, 2, 4)
    with pytest.raises(ConfigError, match="batch_size=6 cannot be split into microbatches=2"):
        resolve_layout(SMALL, par, batch_size=6)


def test_too_many_stages_names_the_fix() -> None:
    tiny = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    par = ParallelConfig(pp=2, schedule="zb-v")  # 4 stages, 3 blocks
    with pytest.raises(ConfigError, match=r"layers=1 .* 3 blocks\) cannot be split into pp=2 "
                       r"stages with virtual_stages=2 \(4 stages\); use pp\*virtual_stages <= 3"):
        resolve_layout(tiny, par)


def test_tensor_parallel_sizes_are_checked_before_anything_runs() -> None:
    gqa = ModelConfig(flavour="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, max_seq_len=16)
    layout = resolve_layout(gqa, ParallelConfig(pp=2, tp=2, microbatches=2), batch_size=4)
    assert (layout.tp, layout.world_size, layout.to_dict()["tp"]) == (2, 4, 2)
    assert "pp=2 x dp=1 x tp=2 = 4 ranks" in layout.describe()
    with pytest.raises(ConfigError, match="n_kv_heads=2 is not divisible by tp=4"):
        resolve_layout(gqa, ParallelConfig(tp=4))
    with pytest.raises(ConfigError, match="n_heads=2 is not divisible by tp=4"):
        resolve_layout(SMALL, ParallelConfig(tp=4))
    odd_mlp = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=50)
    with pytest.raises(ConfigError, match="d_ff=50 is not divisible by tp=4; set d_ff"):
        resolve_layout(odd_mlp, ParallelConfig(tp=4))
    sp = ParallelConfig(tp=2, sequence_parallel=True)
    assert "(sequence parallel)" in resolve_layout(gqa, sp).describe()
    with pytest.raises(ConfigError, match="sequence length 15 is not a multiple"):
        resolve_layout(gqa, sp, seq_len=15)
    with pytest.raises(ConfigError, match="sequence_parallel=True .* but tp=1; set tp > 1"):
        ParallelConfig(sequence_parallel=True)


def test_a_given_schedule_replaces_the_configured_one() -> None:
    custom = resolve_schedule(name="gpipe", pp=2, microbatches=4)
    layout = resolve_layout(SMALL, ParallelConfig(pp=2, microbatches=4), schedule=custom)
    assert layout.schedule is custom and layout.schedule_name == "gpipe"
    with pytest.raises(ConfigError, match="has 2 ranks but pp=3; set pp=2"):
        resolve_layout(SMALL, ParallelConfig(pp=3, microbatches=4), schedule=custom)
    with pytest.raises(ConfigError, match="runs 4 microbatches but microbatches=2"):
        resolve_layout(SMALL, ParallelConfig(pp=2, microbatches=2), schedule=custom)
    fwd = Schedule.build("fwd", 1, Placement.looped(2), {0: [], 1: []})
    with pytest.raises(ConfigError, match="cannot train"):
        resolve_layout(SMALL, ParallelConfig(pp=2, microbatches=1), schedule=fwd)


def test_schedule_file_is_read_and_checked_here(tmp_path: Path) -> None:
    table = tmp_path / "three.csv"
    write_schedule_csv(resolve_schedule(name="zb-h1", pp=3, microbatches=4), table)
    layout = resolve_layout(SMALL, ParallelConfig(pp=3, schedule_file=str(table)))
    assert layout.schedule_name == "zb-h1" and layout.pp == 3
    with pytest.raises(ConfigError, match=r"has 3 ranks \(rows\) but pp=2; set pp=3"):
        resolve_layout(SMALL, ParallelConfig(pp=2, schedule_file=str(table)))
    with pytest.raises(ConfigError, match="places 1 stages per rank but virtual_stages=2"):
        resolve_layout(SMALL, ParallelConfig(pp=3, virtual_stages=2, schedule_file=str(table)))
    bad = tmp_path / "bad.csv"
    bad.write_text("0,F0,B0\n1,F0,X0\n")
    with pytest.raises(ConfigError, match="schedule_file=.*'X0' is not an action"):
        resolve_layout(SMALL, ParallelConfig(pp=2, microbatches=1, schedule_file=str(bad)))
    with pytest.raises(ScheduleError, match="set virtual_stages=2"):
        resolve_schedule(name="zb-v", pp=2, microbatches=4, virtual_stages=3)


def test_describe_shows_every_stage_its_blocks_and_share() -> None:
    layout = resolve_layout(HEAVY_HEAD, ParallelConfig(pp=2, schedule="interleaved-1f1b",
                                                       microbatches=4, partition="cost"),
                            batch_size=8)
    text = layout.describe()
    assert text.startswith("layout: pp=2 x dp=1 x tp=1 = 2 ranks, schedule interleaved-1f1b "
                           "(looped placement, 2 stages per rank), 4 microbatches of 2 sequences")
    assert f"partition cost {layout.partition}" in text
    for s, ((start, end), share) in enumerate(zip(layout.partition.bounds,
                                                  layout.stage_shares(), strict=True)):
        rank = layout.placement.rank_of(s)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"  stage {s} "))
        assert f"on rank {rank}: blocks {start}:{end} " in line and f"{share:.1%}" in line
    assert "(embedding + layers 0-" in text and "head)" in text
    assert "rank 0 (stages 0, 2)" in text and "busiest rank:" in text
    assert layout.to_dict()["stage_blocks"] == [list(b) for b in layout.partition.bounds]


def test_layout_refuses_parts_that_do_not_fit() -> None:
    good = resolve_layout(SMALL, ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="has 3 stages but schedule '1f1b' runs 2"):
        Layout(schedule=good.schedule, partition=Partition.from_sizes([3, 3, 2]),
               partition_method="uniform", block_costs=good.block_costs, cost_source="x")
    with pytest.raises(ConfigError, match="got 2 block costs for 8 blocks"):
        Layout(schedule=good.schedule, partition=good.partition, partition_method="uniform",
               block_costs=(1.0, 2.0), cost_source="x")


def test_one_place_decides_chunks_partitions_and_schedules() -> None:
    """Outside parallel/layout.py, nothing in src builds schedules or splits blocks."""
    src = Path(__file__).resolve().parents[1] / "src" / "conveyor"
    # CostModel.uniform (sim/cost.py) is a unit-cost model, not a partition: `.uniform(` is left out
    pattern = re.compile(r"make_schedule|build_schedule|by_params\(|by_cost\(|make_partition"
                         r"|SCHEDULE_CHUNKS|read_schedule_csv|(?<![.\w])uniform\(")
    allowed = {"parallel/partition.py", "parallel/layout.py"}
    stray = [
        f"{path.relative_to(src)}:{n}: {line.strip()}"
        for path in sorted(src.rglob("*.py"))
        if path.relative_to(src).parts[0] != "schedules"
        and path.relative_to(src).as_posix() not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("def uniform(")
    ]
    assert not stray, "\n".join(stray)


def test_default_partition_balances_the_ranks_of_every_schedule() -> None:
    # balanced by default: the busiest rank's predicted share beats the uniform split's
    model = ModelConfig()
    for schedule in ("1f1b", "interleaved-1f1b", "zb-v", "dualpipev"):
        par = ParallelConfig(pp=2, microbatches=8, schedule=schedule)
        assert par.partition == "cost"
        default = resolve_layout(model, par)
        uniform = resolve_layout(model, replace(par, partition="uniform"))
        busiest = max(default.rank_shares())
        assert busiest < max(uniform.rank_shares()), schedule
        assert busiest <= 0.56, (schedule, default.rank_shares())
