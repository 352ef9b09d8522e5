"""V-placement schedules: DualPipeV against torch's, V-Half and V-Min against their closed forms."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from conveyor.cli import main
from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    SCHEDULES,
    Action,
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    build_schedule,
    check_virtual_stages,
    dualpipev,
    execute,
    lower,
    one_f_one_b,
    v_half,
    v_min,
    validate,
    zb_v,
)

# F = I = W = 1 and a full B worth its I and W: 6 units per microbatch on every V rank
SPLIT_COSTS = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}


def _split_costs(rank: int, a: Action) -> float:
    return sum(SPLIT_COSTS[p.kind] for p in a.parts) if a.kind.is_compute else 0.0


def _rows(schedule: Schedule) -> dict[int, list[str]]:
    return {r: [str(a) for a in acts] for r, acts in schedule.actions.items()}


# --- DualPipeV ------------------------------------------------------------------------------


def _torch_dualpipev(p: int, m: int) -> dict[int, list[str]]:
    """torch's ScheduleDualPipeV.pipeline_order, built from stand-in stages (no process group)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    stages = [
        SimpleNamespace(group_size=p, group_rank=0, num_stages=2 * p, submod=None) for _ in range(2)
    ]
    order = schedules.ScheduleDualPipeV(stages, m).pipeline_order
    return {r: [str(a) for a in order[r] if a is not None] for r in range(p)}


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 6])
def test_dualpipev_is_torchs_action_for_action(p: int) -> None:
    for m in range(2 * p, 2 * p + 9):
        assert _rows(dualpipev(p, m)) == _torch_dualpipev(p, m), (p, m)


def test_dualpipev_literal_table() -> None:
    s = dualpipev(2, 4)
    assert _rows(s) == {
        0: ["0F0", "0F1", "0F2", "3F0", "3I0", "3W0", "3F1", "(0F3;3B1)OVERLAP_F_B",
            "(3F2;0B0)OVERLAP_F_B", "3B2", "(3F3;0B1)OVERLAP_F_B", "3B3", "0I2", "0W2", "0I3",
            "0W3"],
        1: ["1F0", "2F0", "1F1", "2F1", "1F2", "2B0", "(2F2;1B0)OVERLAP_F_B",
            "(1F3;2B1)OVERLAP_F_B", "(2F3;1B1)OVERLAP_F_B", "2B2", "1B2", "2I3", "1I3", "2W3",
            "1W3"],
    }
    # the clock `conveyor schedule show` prints: an overlapped pair runs its halves one
    # after the other by default, so it takes two ticks, as in validate's makespan
    assert execute(s).clock_table().splitlines() == [
        "rank 0: 0F0     0F1     0F2     3F0     3I0     3W0     3F1     0F3+3B1 0F3+3B1 "
        "3F2+0B0 3F2+0B0 3B2     .       3F3+0B1 3F3+0B1 3B3     0I2     0W2     0I3     0W3",
        "rank 1: .       1F0     2F0     1F1     2F1     1F2     2B0     2F2+1B0 2F2+1B0 "
        "1F3+2B1 1F3+2B1 2F3+1B1 2F3+1B1 2B2     1B2     .       2I3     1I3     2W3     1W3",
    ]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 6])
def test_dualpipev_closed_forms(p: int) -> None:
    for m in range(2 * p, 3 * p + 6):
        s = dualpipev(p, m)
        assert s.placement == Placement.vshape(p)  # for p = 1 also the looped one
        stats = validate(s)
        assert stats.makespan == 4 * m + 3 * p - 2, (p, m)
        assert stats.bubble_fraction == pytest.approx(3 * (p - 1) / (8 * m + 6 * p - 4))
        assert stats.peak_activations == {r: 2 * p + 1 for r in range(p)}
        assert validate(lower(s)).makespan == stats.makespan
        assert execute(s, _split_costs).makespan == 6 * m + 2 * p - 2


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_dualpipev_phases(p: int) -> None:
    m = 2 * p + 3
    s = dualpipev(p, m)
    for r in range(p):
        acts = s.actions[r]
        pairs = [a for a in acts if a.kind is Kind.OVERLAP_F_B]
        # steady: 2(m - 2p + r + 1) pairs, less the last rank's first; then p - 1 - r more
        assert len(pairs) == 2 * (m - 2 * p + r + 1) - (r == p - 1) + (p - 1 - r)
        for pair in pairs:  # forward of one chunk with the full backward of the other
            f, b = pair.parts
            assert f.kind is Kind.F and b.kind is Kind.B
            assert {f.stage, b.stage} == {r, 2 * p - 1 - r}
        splits = [a for a in s.parts(r) if a.kind is Kind.I]
        assert len(splits) == 2 * p - 1 - r
        assert acts[-1].kind is Kind.W


@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 3), (4, 7)])
def test_dualpipev_needs_two_microbatches_per_rank(p: int, m: int) -> None:
    with pytest.raises(ScheduleError, match=rf"num_microbatches >= {2 * p}"):
        dualpipev(p, m)


# --- V-Half and V-Min ---------------------------------------------------------------------


def _v_half_extra(p: int) -> int:
    return max(p - 1, 6 * -(-p // 2) - 7)


def _v_min_extra(p: int) -> int:
    return max(p - 1, 4 * p - 5 - (2 if p % 3 == 0 else 0))


V_CASES: list[tuple[str, Callable[[int, int], Schedule], Callable[[int], int], Callable[[int], int], Callable[[int], int]]] = [
    # name, builder, idle slots (makespan - 6m), from which m, peak chunks (m large)
    ("v-half", v_half, _v_half_extra, lambda p: p, lambda p: 2 * (p // 2) + 2),
    ("v-min", v_min, _v_min_extra, lambda p: 2, lambda p: 2 * ((p + 4) // 3)),
]


@pytest.mark.parametrize(("name", "build", "extra", "from_m", "peak"), V_CASES)
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 6])
def test_v_closed_forms(name: str, build: Callable[[int, int], Schedule],
                        extra: Callable[[int], int], from_m: Callable[[int], int],
                        peak: Callable[[int], int], p: int) -> None:
    for m in [*range(1, 3 * p + 4), 16, 32]:
        s = build(p, m)
        assert s.name == name and s.placement == Placement.vshape(p) and s.split_backward
        stats = validate(s)  # coverage, no deadlock
        assert stats.makespan >= 6 * m + p - 1  # rank p-1 starts at p-1 with 6m units
        if m >= from_m(p):
            assert stats.makespan == 6 * m + extra(p), (p, m)
            assert stats.bubble_fraction == pytest.approx(extra(p) / (6 * m + extra(p)))
        assert max(stats.peak_activations.values()) == min(2 * m, peak(p)), (p, m)
        assert validate(lower(s)).makespan == stats.makespan


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8])
def test_v_memory_against_1f1b(p: int) -> None:
    m = 4 * p
    one_f = max(validate(one_f_one_b(p, m)).peak_activations.values())  # full stages
    assert one_f == p  # = 2p chunks of a V rank
    half = max(validate(v_half(p, m)).peak_activations.values())
    third = max(validate(v_min(p, m)).peak_activations.values())
    assert half <= p + 2 and 3 * third <= 2 * p + 8  # about 1/2 and 1/3 of 2p chunks
    if p >= 3:
        assert third <= half < 2 * p


def test_v_half_literal_table() -> None:
    assert execute(v_half(4, 4)).clock_table().splitlines() == [
        "rank 0: 0F0 0F1 0F2 0F3 .   .   .   7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 0I0 0W0 .   7F3 7I3 0I1 7W3 0I2 0W1 0W2 .   0I3 0W3",
        "rank 1: .   1F0 1F1 1F2 1F3 .   6F0 .   6F1 6I0 6W0 6F2 6I1 6W1 .   1I0 1W0 6I2 6F3 6W2 1I1 6I3 1I2 1W1 6W3 1W2 1I3 1W3 .",
        "rank 2: .   .   2F0 2F1 2F2 5F0 .   5F1 .   5F2 5I0 5W0 2F3 5I1 2I0 5W1 2W0 5F3 5I2 2I1 5W2 2I2 5I3 2W1 2W2 2I3 5W3 2W3 .",
        "rank 3: .   .   .   3F0 4F0 3F1 4F1 3F2 4F2 .   .   4I0 4W0 3I0 3W0 3F3 4F3 4I1 3I1 4I2 3I2 4W1 3W1 4I3 3I3 4W2 3W2 4W3 3W3",
    ]


def test_v_min_literal_table() -> None:
    assert execute(v_min(4, 4)).clock_table().splitlines() == [
        "rank 0: 0F0 0F1 0F2 .   .   .   .   7F0 7I0 7W0 7F1 7I1 7W1 0F3 .   0I0 0W0 .   .   7F2 7I2 0I1 7W2 0W1 .   7F3 7I3 0I2 7W3 0W2 .   .   .   0I3 0W3",
        "rank 1: .   1F0 1F1 .   .   .   6F0 .   6F1 6I0 6W0 1F2 6I1 6W1 1I0 1W0 1F3 .   6F2 .   1I1 6I2 6W2 1W1 6F3 .   1I2 6I3 1W2 6W3 .   .   1I3 1W3 .",
        "rank 2: .   .   2F0 2F1 .   5F0 .   5F1 .   .   5I0 5W0 2F2 2I0 2W0 5I1 5W1 5F2 2F3 2I1 2W1 .   5I2 5F3 5W2 2I2 2W2 .   5I3 5W3 .   2I3 2W3 .   .",
        "rank 3: .   .   .   3F0 4F0 3F1 4F1 .   .   .   .   4I0 3I0 4W0 3W0 3F2 4F2 4I1 3I1 4W1 3W1 3F3 4F3 4I2 3I2 4W2 3W2 .   .   4I3 3I3 4W3 3W3 .   .",
    ]


def test_v_figures_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    """Print unit-cost bubble and peaks of the V schedules (run with -s to see them)."""
    lines = ["schedule    p   m  makespan  bubble  bubble(B=I+W)  peak chunks"]
    for name in ("zb-v", "dualpipev", "v-half", "v-min"):
        for p in (2, 4):
            for m in (8, 16):
                s = build_schedule(name, p, m, 2)
                stats = validate(s)
                split = execute(s, _split_costs).bubble_fraction()
                lines.append(f"{name:10} {p:2} {m:3} {stats.makespan:9g} {stats.bubble_fraction:7.4f}"
                             f" {split:14.4f}  {max(stats.peak_activations.values())}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert max(validate(zb_v(4, 16)).peak_activations.values()) == 8


# --- registry and CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dualpipev", "v-half", "v-min"])
def test_registered_with_two_chunks(name: str) -> None:
    assert name in SCHEDULES and SCHEDULE_CHUNKS[name] == 2
    s = build_schedule(name, 3, 8, 2)
    assert s.name == name and s.num_stages == 6 and s.placement.shape == "vshape"
    with pytest.raises(ScheduleError, match="virtual_stages=2"):
        check_virtual_stages(name, 1)


def test_schedule_show_dualpipev(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "show", "--schedule", "dualpipev", "--pp", "2",
                 "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "schedule 'dualpipev': 2 ranks, 4 stages (vshape placement), 8 microbatches" in out
    assert "(0F3;3B1)OVERLAP_F_B" in out
    assert "makespan: 36" in out and "bubble fraction: 0.0417" in out
    assert "rank 0: 5, rank 1: 5" in out

# Training equivalence (gloo and NCCL semantics, pp 2 to 4) is in test_equivalence.py.
