"""Which compute actions may overlap: the happens-before order, and the cores it lets an action take."""

from __future__ import annotations

import random

import pytest

from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    SCHEDULES,
    Schedule,
    ScheduleError,
    build_schedule,
    execute,
    lower,
)
from conveyor.schedules.concurrency import concurrent_ranks, core_shares


def _table(shares: dict[int, dict]) -> dict[int, dict[str, int]]:
    return {r: {str(a): n for a, n in row.items()} for r, row in shares.items()}


def test_1f1b_lends_the_first_forward_and_the_last_backward() -> None:
    # rank 1 has nothing to do before rank 0's 0F0, and rank 0's last 0B7 runs after
    # rank 1's last backward; rank 1's own last backward may overlap rank 0's 0B6
    assert _table(core_shares(build_schedule("1f1b", 2, 8))) == {0: {"0F0": 2, "0B7": 2}, 1: {}}


def test_deeper_pipelines_lend_in_proportion_to_the_idle_ranks() -> None:
    shares = _table(core_shares(build_schedule("1f1b", 4, 8)))
    # 0F0 runs alone; 1F0 may meet rank 0's 0F1 while ranks 2 and 3 wait: half the cores each
    assert shares == {0: {"0F0": 4, "0B7": 4}, 1: {"1F0": 2, "1B7": 2}, 2: {}, 3: {}}


def test_gpipe_lends_at_its_turn_from_forwards_to_backwards() -> None:
    shares = _table(core_shares(build_schedule("gpipe", 2, 4)))
    assert shares == {0: {"0F0": 2, "0B3": 2}, 1: {"1F3": 2, "1B0": 2}}


def test_one_rank_lends_nothing() -> None:
    assert core_shares(build_schedule("1f1b", 1, 4)) == {0: {}}


def test_a_lowered_schedule_is_refused() -> None:
    with pytest.raises(ScheduleError, match="before lower"):
        concurrent_ranks(lower(build_schedule("1f1b", 2, 4)))


def _schedules() -> list[Schedule]:
    out = []
    for name, chunks in SCHEDULE_CHUNKS.items():
        for p, m in [(2, 4), (3, 6), (4, 8)]:
            try:
                out.append(build_schedule(name, p, m, chunks or 2))
            except ScheduleError:
                continue  # sizes this schedule does not take
    assert {s.name for s in out} >= set(SCHEDULES) - {"forward-only"}
    return out


@pytest.mark.parametrize("seed", range(3))
def test_lending_never_oversubscribes_whatever_the_costs(seed: int) -> None:
    """In executions with random costs, the cores the running actions take never exceed the ranks'.

    And an action said to overlap no other rank really runs alone.
    """
    rng = random.Random(seed)
    for schedule in _schedules():
        conc = concurrent_ranks(schedule)
        shares = core_shares(schedule)
        costs = {(r, a): rng.uniform(0.2, 3.0) for r, row in schedule.actions.items() for a in row}
        run = execute(schedule, lambda r, a, costs=costs: costs[(r, a)])
        spans = [(t.start, t.end, t.rank, t.action) for row in run.timeline.values() for t in row]
        for start, end, rank, a in spans:
            busy = [(r, b) for s, e, r, b in spans if r != rank and s < end and e > start]
            if conc[rank][a] == 0:
                assert not busy, f"{schedule.name}: {a} on rank {rank} overlaps {busy}"
            assert len({r for r, _ in busy}) <= conc[rank][a], (schedule.name, a)
            # the set of running actions only grows at a start: checking every start is complete
            taken = sum(shares[r].get(b, 1) for s, e, r, b in spans if s <= start < e)
            assert taken <= schedule.num_ranks, f"{schedule.name}: {taken} ranks' cores at {start}"
