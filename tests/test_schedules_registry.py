"""Every registered schedule: valid, ordered, lowerable, over many sizes; names and chunks."""

from __future__ import annotations

import pytest

from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    SCHEDULES,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    check_virtual_stages,
    describe,
    lower,
    validate,
)

SIZES = [(p, m) for p in (1, 2, 3, 4, 5, 8) for m in (1, 2, 3, 4, 5, 7, 8, 9, 16)]
CASES = [(name, v) for name, chunks in SCHEDULE_CHUNKS.items() for v in ((chunks,) if chunks else (2, 3))]


def _check_order(s: Schedule) -> None:
    """On its rank, every F comes before its B or I, and every I before its W."""
    for rank in s.actions:
        # position of each single action; the two halves of an overlapped pair share one step
        index = {
            (p.kind, p.stage, p.microbatch): (i, j)
            for i, a in enumerate(s.actions[rank])
            for j, p in enumerate(a.parts)
        }
        for (kind, stage, mb), i in index.items():
            before = {Kind.B: Kind.F, Kind.I: Kind.F, Kind.W: Kind.I}.get(kind)
            if before is not None:
                assert index[(before, stage, mb)] < i, f"{kind.value}{mb} of stage {stage} too early"


def _check_lowering(s: Schedule) -> None:
    """Every send has one receive, and each (sender, receiver, kind) channel keeps one order."""
    low = lower(s)
    place = s.placement
    sent: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    got: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    for rank, acts in low.actions.items():
        for a in acts:
            if a.kind is Kind.SEND_F:
                sent.setdefault((rank, place.rank_of(a.stage + 1), "F"), []).append((a.stage + 1, a.microbatch))
            elif a.kind is Kind.SEND_B:
                sent.setdefault((rank, place.rank_of(a.stage - 1), "B"), []).append((a.stage - 1, a.microbatch))
            elif a.kind is Kind.RECV_F:
                got.setdefault((place.rank_of(a.stage - 1), rank, "F"), []).append((a.stage, a.microbatch))
            elif a.kind is Kind.RECV_B:
                got.setdefault((place.rank_of(a.stage + 1), rank, "B"), []).append((a.stage, a.microbatch))
    assert sent == got
    crossings = sum(place.rank_of(st) != place.rank_of(st + 1) for st in range(s.num_stages - 1))
    directions = 1 if s.forward_only else 2
    assert sum(len(x) for x in sent.values()) == directions * crossings * s.num_microbatches
    assert validate(low).makespan == validate(s).makespan  # zero latency: same clock


@pytest.mark.parametrize("name,v", CASES)
def test_every_schedule_is_valid_ordered_and_lowers(name: str, v: int) -> None:
    for p, m in SIZES:
        if name == "dualpipev" and m < 2 * p:
            continue  # DualPipeV needs m >= 2p (test_schedules_v.py checks the refusal)
        s = build_schedule(name, p, m, v)
        assert (s.num_stages, s.num_ranks, s.num_microbatches) == (p * v, p, m)
        stats = validate(s)  # coverage and no deadlock
        assert 0 <= stats.steady_bubble_fraction <= stats.bubble_fraction + 1e-12 < 1, (p, m)
        _check_order(s)
        _check_lowering(s)


def test_registry_names_and_chunks() -> None:
    assert set(SCHEDULES) == set(SCHEDULE_CHUNKS) == {
        "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "forward-only",
        "dualpipev", "v-half", "v-min",
    }
    assert SCHEDULE_CHUNKS["zb-v"] == 2 and SCHEDULE_CHUNKS["interleaved-1f1b"] is None
    assert build_schedule("zb-v", 3, 6, virtual_stages=2).num_stages == 6
    assert build_schedule("interleaved-1f1b", 3, 6, virtual_stages=4).num_stages == 12
    assert build_schedule("1f1b", 3, 6) == SCHEDULES["1f1b"](3, 6)


@pytest.mark.parametrize(
    "name,v,message",
    [
        ("1f1b", 2, r"'1f1b' runs exactly 1 model chunk per rank: got virtual_stages=2; "
                    r"set virtual_stages=1 or use 'interleaved-1f1b'"),
        ("forward-only", 3, r"got virtual_stages=3; set virtual_stages=1"),
        ("zb-v", 1, r"'zb-v' runs exactly 2 model chunks per rank: got virtual_stages=1; "
                    r"set virtual_stages=2$"),
        ("zb-v", 4, r"got virtual_stages=4; set virtual_stages=2"),
        ("interleaved-1f1b", 1, r"'interleaved-1f1b' needs virtual_stages >= 2 model chunks "
                                r"per rank: got virtual_stages=1; set virtual_stages=2 or more"),
    ],
)
def test_virtual_stages_mismatch_says_the_fix(name: str, v: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        check_virtual_stages(name, v)
    with pytest.raises(ScheduleError, match=message):
        build_schedule(name, 2, 4, v)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("p,m", [(0, 4), (2, 0), (-1, 3)])
def test_sizes_must_be_positive(name: str, p: int, m: int) -> None:
    bad = "num_ranks" if p < 1 else "num_microbatches"
    with pytest.raises(ScheduleError, match=rf"needs {bad} >= 1: got {bad}="):
        build_schedule(name, p, m, SCHEDULE_CHUNKS[name] or 2)


def test_unknown_schedule_in_check_virtual_stages() -> None:
    with pytest.raises(ScheduleError, match="'zb-h3' is unknown; choose one of 1f1b, dualpipev"):
        check_virtual_stages("zb-h3", 1)


def test_describe_shows_tables_and_figures() -> None:
    text = describe(build_schedule("zb-h1", 3, 4))
    assert text.splitlines()[0] == (
        "schedule 'zb-h1': 3 ranks, 3 stages (looped placement), 4 microbatches; "
        "I = input grad, W = weight grad"
    )
    assert "rank 0: 0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3" in text
    assert "rank 2: .  .  F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3" in text
    assert "makespan: 14" in text
    assert "bubble fraction: 0.1429 " in text  # (p-1)/(3m+p-1) = 2/14
    # held until the W, which rank r runs r steps after its I: min(p, m) = 3 on every rank
    assert (
        "peak activations, in stage-microbatches held (F done, B or W not yet): "
        "rank 0: 3, rank 1: 3, rank 2: 3"
    ) in text
    fwd = describe(build_schedule("forward-only", 2, 2))
    assert "forward only (no backward)" in fwd and "rank 0: 0, rank 1: 0" in fwd
    assert "(vshape placement)" in describe(build_schedule("zb-v", 2, 4, 2))
    assert "B = full backward" in describe(build_schedule("gpipe", 2, 2))
    assert text.splitlines()[-1] == "cores lent by idle ranks (--lend-cores, on CPU): rank 0: 0F0 x3"
    assert describe(build_schedule("gpipe", 2, 2)).endswith(
        "rank 0: 0F0 x2 0B1 x2, rank 1: 1F1 x2 1B0 x2")
