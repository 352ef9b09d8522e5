"""Schedules as data: literal tables for small cases, properties over many sizes."""

from __future__ import annotations

import itertools

import pytest

from conveyor.schedules import (
    Action,
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    build_schedule,
    execute,
    gpipe,
    lower,
    one_f_one_b,
    overlap,
    validate,
)
from conveyor.schedules.validate import activation_events, peak_activations

SIZES = [(p, m) for p in (1, 2, 3, 4, 5, 8) for m in (1, 2, 3, 4, 7, 8, 16)]


def test_action_text_round_trip() -> None:
    for kind in Kind:
        if kind is Kind.OVERLAP_F_B:
            continue
        for stage, mb in [(0, 0), (3, 12), (11, 7)]:
            a = Action(stage, kind, mb)
            assert Action.parse(str(a)) == a
    assert str(Action(1, Kind.F, 0)) == "1F0"
    assert str(Action(0, Kind.I, 3)) == "0I3"
    assert str(Action(0, Kind.SEND_B, 3)) == "0SEND_B3"
    pair = overlap(Action(2, Kind.F, 5), Action(1, Kind.B, 3))
    assert str(pair) == "(2F5;1B3)OVERLAP_F_B"
    assert Action.parse(str(pair)) == pair
    assert pair.parts == (Action(2, Kind.F, 5), Action(1, Kind.B, 3))


def test_action_text_is_torchs() -> None:
    from torch.distributed.pipelining.schedules import _Action

    for text in ["1F0", "0I3", "2W1", "0B2", "3SEND_F4", "1RECV_B0", "(2F5;1B3)OVERLAP_F_B"]:
        assert str(_Action.from_str(text)) == text == str(Action.parse(text))


@pytest.mark.parametrize("text", ["(1F0)OVERLAP_F_B", "(1B0;1F0)OVERLAP_F_B", "(1F0;1W0)OVERLAP_F_B"])
def test_overlap_is_a_forward_then_a_backward(text: str) -> None:
    with pytest.raises(ScheduleError):
        Action.parse(text)


@pytest.mark.parametrize("text", ["", "F0", "1X0", "1F", "a1F0", "1F0x"])
def test_action_parse_rejects(text: str) -> None:
    with pytest.raises(ScheduleError, match="cannot parse action"):
        Action.parse(text)


def test_1f1b_literal_table() -> None:
    table = execute(one_f_one_b(3, 4)).clock_table()
    assert table.splitlines() == [
        "rank 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3",
        "rank 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .",
        "rank 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .",
    ]


def test_gpipe_literal_table() -> None:
    table = execute(gpipe(3, 4)).clock_table()
    assert table.splitlines() == [
        "rank 0: F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3",
        "rank 1: .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .",
        "rank 2: .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .",
    ]


def test_1f1b_action_list() -> None:
    s = one_f_one_b(2, 3)
    assert [str(a) for a in s.actions[0]] == ["0F0", "0F1", "0B0", "0F2", "0B1", "0B2"]
    assert [str(a) for a in s.actions[1]] == ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2"]


# the schedules whose bubble is 1F1B's; the others have their own tests/test_schedules_*.py
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", SIZES)
def test_bubble_closed_form_and_order(name: str, p: int, m: int) -> None:
    s = build_schedule(name, p, m)
    stats = validate(s)
    assert stats.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert stats.makespan == 2 * (m + p - 1)
    for rank in range(p):
        seen: set[tuple[Kind, int]] = set()
        for a in s.actions[rank]:
            if a.kind is Kind.B:
                assert (Kind.F, a.microbatch) in seen, f"{a} before its F on rank {rank}"
            seen.add((a.kind, a.microbatch))
    # lowering keeps timing under zero latency and pairs every send with one receive
    lowered = lower(s)
    assert validate(lowered).bubble_fraction == pytest.approx(stats.bubble_fraction)
    sends = {(a.kind, a.stage, a.microbatch) for acts in lowered.actions.values() for a in acts
             if a.kind in (Kind.SEND_F, Kind.SEND_B)}
    recvs = {(a.kind, a.stage, a.microbatch) for acts in lowered.actions.values() for a in acts
             if a.kind in (Kind.RECV_F, Kind.RECV_B)}
    assert {(Kind.RECV_F, st + 1, mb) for k, st, mb in sends if k is Kind.SEND_F} == {
        r for r in recvs if r[0] is Kind.RECV_F
    }
    assert {(Kind.RECV_B, st - 1, mb) for k, st, mb in sends if k is Kind.SEND_B} == {
        r for r in recvs if r[0] is Kind.RECV_B
    }
    assert len(sends) == len(recvs) == 2 * (p - 1) * m


@pytest.mark.parametrize("p,m", SIZES)
def test_peak_activations(p: int, m: int) -> None:
    assert validate(gpipe(p, m)).peak_activations == {r: m for r in range(p)}
    assert validate(one_f_one_b(p, m)).peak_activations == {r: min(p - r, m) for r in range(p)}


def test_peak_activations_held_until_b_or_w() -> None:
    # rank 0 mixes a split backward (0I0 .. 0W0) with a full one (0B1): 0I0 frees nothing,
    # so 0F1 makes two held at once and only 0B1 and 0W0 release them
    s = _custom({0: ["0F0", "0I0", "0F1", "0B1", "0W0"], 1: ["1F0", "1B0", "1F1", "1I1", "1W1"]}, m=2)
    assert validate(s).peak_activations == {0: 2, 1: 1}
    assert activation_events(s, 0) == [
        (Action.parse("0F0"), 1), (Action.parse("0F1"), 1), (Action.parse("0B1"), -1),
        (Action.parse("0W0"), -1),
    ]
    # weighted by stage: the same walk in other units (the simulator's bytes)
    assert peak_activations(s, lambda stage: 10 * (stage + 1)) == {0: 20, 1: 20}


def test_overlapped_pair_holds_its_forward_before_its_backward_frees() -> None:
    s = _custom({0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "(1F1;1B0)OVERLAP_F_B", "1B1"]}, m=2)
    stats = validate(s)
    assert stats.peak_activations == {0: 2, 1: 2}  # 1F1's activations exist before 1B0 frees
    # unit costs per part: the pair spans ticks 2..4 (F + B), and 0B0 waits for it to end
    assert stats.makespan == 6
    low = lower(s)
    assert [str(a) for a in low.actions[1]] == [
        "1RECV_F0", "1F0", "1RECV_F1", "(1F1;1B0)OVERLAP_F_B", "1SEND_B0", "1B1", "1SEND_B1",
    ]
    assert validate(low).makespan == stats.makespan


def test_1f1b_lowered_pairs_in_same_order_on_both_sides() -> None:
    # NCCL matches point-to-point operations by order, so each pair of ranks must
    # post sends and receives of one direction in the same order.
    lowered = lower(one_f_one_b(4, 8))
    for r in range(3):
        sent = [a.microbatch for a in lowered.actions[r] if a.kind is Kind.SEND_F]
        got = [a.microbatch for a in lowered.actions[r + 1] if a.kind is Kind.RECV_F]
        assert sent == got
        sent_b = [a.microbatch for a in lowered.actions[r + 1] if a.kind is Kind.SEND_B]
        got_b = [a.microbatch for a in lowered.actions[r] if a.kind is Kind.RECV_B]
        assert sent_b == got_b


def _custom(rows: dict[int, list[str]], m: int, p: int = 2) -> Schedule:
    actions = {r: [Action.parse(x) for x in row] for r, row in rows.items()}
    return Schedule.build("custom", m, Placement.looped(p), actions)


def test_deadlock_names_rank_and_action() -> None:
    # rank 1 wants the backward of mb 1 before it ran its forward of mb 0's successor
    s = _custom({0: ["0F0", "0B0"], 1: ["1B0", "1F0"]}, m=1)
    with pytest.raises(ScheduleError, match=r"deadlocks") as err:
        validate(s)
    msg = str(err.value)
    assert "rank 1 step 0: 1B0 waits for 1F0" in msg
    assert "[1B0]" in msg  # the grid marks the stuck action


def test_cross_rank_wait_cycle_is_deadlock() -> None:
    s = _custom({0: ["0B0", "0F0"], 1: ["1F0", "1B0"]}, m=1)
    with pytest.raises(ScheduleError, match="rank 0 step 0: 0B0 waits for 0F0"):
        validate(s)


@pytest.mark.parametrize(
    "rows,reason",
    [
        ({0: ["0F0", "0B0"], 1: ["1F0"]}, "never runs 1B0"),
        ({0: ["0F0", "0B0", "0F0"], 1: ["1F0", "1B0"]}, "appears more than once"),
        ({0: ["1F0", "0F0", "0B0"], 1: ["1F0", "1B0"]}, "placed on rank 1, not on rank 0"),
        ({0: ["0F0", "0B0", "0F1"], 1: ["1F0", "1B0"]}, "microbatch 1 is out of range"),
        ({0: ["0F0", "0B0", "2F0"], 1: ["1F0", "1B0"]}, "stage 2 does not exist"),
    ],
)
def test_malformed_schedules(rows: dict[int, list[str]], reason: str) -> None:
    with pytest.raises(ScheduleError, match=reason):
        validate(_custom(rows, m=1))


def test_lower_rejects_communication_in_input() -> None:
    s = _custom({0: ["0F0", "0SEND_F0", "0B0"], 1: ["1F0", "1B0"]}, m=1)
    with pytest.raises(ScheduleError, match="added by lower"):
        lower(s)


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(ScheduleError, match="schedule 'pipedream' is unknown; choose one of"):
        build_schedule("pipedream", 2, 4)


def test_latency_shifts_receivers() -> None:
    s = lower(one_f_one_b(2, 2))
    fast = execute(s, latency=lambda a: 0.0).makespan
    slow = execute(s, latency=lambda a: 0.5).makespan
    assert slow > fast


@pytest.mark.parametrize("p,m", list(itertools.product((2, 4), (1, 4))))
def test_placement_helpers(p: int, m: int) -> None:
    place = Placement.looped(p, chunks=2)
    assert place.num_stages == 2 * p and place.num_ranks == p
    assert place.stages_of(0) == [0, p]
    v = Placement.vshape(p)
    assert v.stages_of(0) == [0, 2 * p - 1]
    assert v.rank_of(p) == p - 1
