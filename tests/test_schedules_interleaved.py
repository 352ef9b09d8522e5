"""Interleaved 1F1B: literal table, Megatron order, closed-form bubble for any m."""

from __future__ import annotations

import pytest

from conveyor.schedules import (
    Placement,
    ScheduleError,
    execute,
    interleaved_1f1b,
    validate,
)

GRID = [(p, v) for p in range(1, 7) for v in (2, 3, 4)]


def test_literal_table() -> None:
    # rank 0 holds stages 0 and 2, rank 1 holds stages 1 and 3
    assert execute(interleaved_1f1b(2, 4, 2)).clock_table().splitlines() == [
        "rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3",
        "rank 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .",
    ]


def test_megatron_order_when_p_divides_m() -> None:
    # rounds of p microbatches: forwards chunk by chunk, backwards in reverse chunk order;
    # rank 1 of 2 warms up with 2*(p-1-r) + (v-1)*p = 2 forwards
    s = interleaved_1f1b(2, 4, 2)
    assert [str(a) for a in s.actions[1]] == [
        "1F0", "1F1", "3F0", "3B0", "3F1", "3B1", "1F2", "1B0",
        "1F3", "1B1", "3F2", "3B2", "3F3", "3B3", "1B2", "1B3",
    ]
    assert s.placement == Placement.looped(2, 2)


@pytest.mark.parametrize("p,v", GRID)
def test_closed_form(p: int, v: int) -> None:
    for m in range(1, 19):
        stats = validate(interleaved_1f1b(p, m, v))
        assert stats.makespan == 2 * (v * max(m, p) + min(m, p) - 1), f"p={p} m={m}"
        if m >= p:
            assert stats.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
        first_round = m // max(1, m // p) + (m % max(1, m // p) > 0)
        assert stats.peak_activations == {
            r: min(v * m, 2 * (p - 1 - r) + (v - 1) * first_round + 1) for r in range(p)
        }


@pytest.mark.parametrize("v", [1, 0])
def test_needs_two_chunks(v: int) -> None:
    with pytest.raises(
        ScheduleError,
        match=rf"needs virtual_stages >= 2 model chunks per rank: got virtual_stages={v}; "
        "use virtual_stages=2 or more, or schedule '1f1b'",
    ):
        interleaved_1f1b(2, 4, v)
