"""Zero-bubble (ZB-H1, ZB-H2, ZB-V) and forward-only schedules: tables and closed forms."""

from __future__ import annotations

import pytest

from conveyor.schedules import (
    Action,
    DeadlockError,
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    execute,
    forward_only,
    lower,
    one_f_one_b,
    validate,
    zb_h1,
    zb_h2,
    zb_v,
)

RANKS = range(1, 9)
MICROBATCHES = range(1, 21)


def test_zb_h1_literal_table() -> None:
    assert execute(zb_h1(3, 4)).clock_table().splitlines() == [
        "rank 0: F0 F1 F2 .  .  I0 W0 F3 I1 W1 I2 W2 I3 W3",
        "rank 1: .  F0 F1 .  I0 F2 I1 W0 F3 I2 W1 I3 W2 W3",
        "rank 2: .  .  F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3",
    ]


def test_zb_h2_literal_table() -> None:
    assert execute(zb_h2(3, 5)).clock_table().splitlines() == [
        "rank 0: F0 F1 F2 F3 F4 I0 W0 I1 W1 I2 W2 I3 W3 I4 W4 .  .",
        "rank 1: .  F0 F1 F2 I0 F3 I1 F4 I2 W0 I3 W1 I4 W2 W3 W4 .",
        "rank 2: .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 W1 W2 W3 W4",
    ]


def test_zb_v_literal_table() -> None:
    # rank 0 holds stages 0 and 3, rank 1 holds 1 and 2
    assert execute(zb_v(2, 4)).clock_table().splitlines() == [
        "rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 "
        "0I2 0W2 0I3 0W3 .",
        "rank 1: .   1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 "
        "2I3 1I3 1W2 2W3 1W3",
    ]


def test_forward_only_literal_table() -> None:
    assert execute(forward_only(3, 4)).clock_table().splitlines() == [
        "rank 0: F0 F1 F2 F3 .  .",
        "rank 1: .  F0 F1 F2 F3 .",
        "rank 2: .  .  F0 F1 F2 F3",
    ]


@pytest.mark.parametrize("p", RANKS)
def test_zb_h1_closed_form_and_memory(p: int) -> None:
    for m in MICROBATCHES:
        stats = validate(zb_h1(p, m))
        # optimal for single-stage ranks: rank p-1 starts at p-1 with 3m units of work, and
        # the last I on rank p-1 still has p-1 Is and a W after it
        assert stats.makespan == max(3 * m + p - 1, 2 * m + 2 * p - 1), f"p={p} m={m}"
        if m >= p:
            assert stats.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
            # the only idle time inside a rank's span is rank r's p-1-r wait for its first I
            idle = p * (p - 1) / 2
            assert stats.steady_bubble_fraction == pytest.approx(idle / (3 * m * p + idle), abs=1e-12)
        # held until its W, r steps after its I: r more than 1F1B's min(p - r, m) on rank r
        assert stats.peak_activations == {r: min(p, m) for r in range(p)}, f"p={p} m={m}"
        one_f_one_b_peaks = validate(one_f_one_b(p, m)).peak_activations
        assert stats.peak_activations[0] == one_f_one_b_peaks[0]  # rank 0 defers no W
        assert all(stats.peak_activations[r] >= one_f_one_b_peaks[r] for r in range(p))


@pytest.mark.parametrize("p", RANKS)
def test_zb_h2_closed_form_and_memory(p: int) -> None:
    for m in MICROBATCHES:
        stats = validate(zb_h2(p, m))
        assert stats.makespan == max(3 * m + p - 1, 2 * m + 2 * p - 1), f"p={p} m={m}"
        if m >= p:
            assert stats.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
        assert (stats.steady_bubble_fraction == 0) == (m >= 2 * p - 1 or p == 1)
        # warm-up w_r = p-1-r + min(p-1-r, x) forwards, Ws lag_r = r + min(r, x) steps late:
        # held until the W, the peak is w_r + lag_r + 1, i.e. 2p - 1 on every rank for large m
        x = min(p - 1, max(0, m - p))
        assert stats.peak_activations == {
            r: min(m, p + min(p - 1 - r, x) + min(r, x)) for r in range(p)
        }, f"p={p} m={m}"
        if m >= 2 * p - 1:
            assert set(stats.peak_activations.values()) == {2 * p - 1}
        if m <= p:
            assert zb_h2(p, m).actions == zb_h1(p, m).actions


@pytest.mark.parametrize("p", RANKS)
def test_zb_v_closed_form_and_memory(p: int) -> None:
    for m in MICROBATCHES:
        s = zb_v(p, m)
        assert s.placement == Placement.vshape(p)
        stats = validate(s)
        assert stats.makespan == max(6 * m + p - 1, 4 * m + 4 * p - 2), f"p={p} m={m}"
        if 2 * m >= 3 * p - 1:
            assert stats.bubble_fraction == pytest.approx((p - 1) / (6 * m + p - 1), abs=1e-12)
        assert (stats.steady_bubble_fraction == 0) == (m >= 2 * p - 1 or p == 1)
        # nothing is released before the first chunk-1 W, which follows 2p-1-r chunk-0 and
        # r+1 chunk-1 forwards (at most m of each); each later F has a W before the next F
        assert stats.peak_activations == {
            r: min(2 * p - 1 - r, m) + min(r + 1, m) for r in range(p)
        }, f"p={p} m={m}"
        assert stats.peak_activations == {r: min(2 * p, 2 * m, m + 1 + r) for r in range(p)}
        # half-size chunks: never more than 1F1B's rank-0 peak, min(p, m) full stages
        assert all(k <= 2 * min(p, m) for k in stats.peak_activations.values())
        if m >= 2 * p - 1:
            assert set(stats.peak_activations.values()) == {2 * p}


@pytest.mark.parametrize("p", RANKS)
def test_forward_only_closed_form(p: int) -> None:
    for m in MICROBATCHES:
        s = forward_only(p, m)
        assert s.forward_only and not s.split_backward
        stats = validate(s)
        assert stats.makespan == m + p - 1, f"p={p} m={m}"
        assert stats.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert stats.peak_activations == {r: 0 for r in range(p)}
        kinds = {a.kind for acts in lower(s).actions.values() for a in acts}
        assert kinds <= {Kind.F, Kind.SEND_F, Kind.RECV_F}


def _custom(rows: dict[int, list[str]], m: int, p: int = 2) -> Schedule:
    actions = {r: [Action.parse(x) for x in row] for r, row in rows.items()}
    return Schedule.build("custom", m, Placement.looped(p), actions)


@pytest.mark.parametrize(
    "rows,reason",
    [
        ({0: ["0F0", "0F1"], 1: ["1F0"]}, "never runs 1F1"),
        ({0: ["0F0", "0B0"], 1: ["1F0"]}, "never runs 1B0"),  # some B: every backward is needed
        ({0: ["0F0", "0I0"], 1: ["1F0", "1B0"]}, "runs 0I0 without 0W0"),  # an I needs its W
        ({0: ["0F0", "0W0"], 1: ["1F0", "1B0"]}, "runs 0W0 without 0I0"),  # a W needs its I
        ({0: ["0F0", "0B0", "0W0"], 1: ["1F0", "1B0"]}, r"runs both 0B0 and a split backward"),
        ({0: ["0F0", "0B0", "0I0"], 1: ["1F0", "1B0"]}, "runs both 0B0"),
    ],
)
def test_coverage_of_forward_only_and_split_schedules(rows: dict[int, list[str]], reason: str) -> None:
    with pytest.raises(ScheduleError, match=reason):
        validate(_custom(rows, m=2 if "1F1" in reason else 1))


def test_deadlock_error_names_the_waits() -> None:
    s = _custom({0: ["0F0", "0B0"], 1: ["1B0", "1F0"]}, m=1)
    with pytest.raises(DeadlockError) as err:
        validate(s)
    assert err.value.waits == {(0, 1): [Action(1, Kind.B, 0)], (1, 0): [Action(1, Kind.F, 0)]}


def test_clock_table_stage_labels() -> None:
    run = execute(one_f_one_b(2, 1))
    assert run.clock_table().splitlines()[0] == "rank 0: F0 .  .  B0"
    assert run.clock_table(stages=True).splitlines()[0] == "rank 0: 0F0 .   .   0B0"
