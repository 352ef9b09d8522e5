"""Schedules as CSV tables: round trips, and every error names rank, column and reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    Action,
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    build_schedule,
    format_schedule_csv,
    lower,
    one_f_one_b,
    overlap,
    read_schedule_csv,
    validate,
    write_schedule_csv,
    zb_v,
)
from conveyor.schedules.ir import B, F, I, W


@pytest.mark.parametrize("name", sorted(SCHEDULE_CHUNKS))
@pytest.mark.parametrize("p,m", [(1, 1), (3, 5), (4, 8)])
def test_round_trip(name: str, p: int, m: int, tmp_path: Path) -> None:
    if name == "dualpipev":
        m = max(m, 2 * p)  # DualPipeV needs m >= 2p
    s = build_schedule(name, p, m, SCHEDULE_CHUNKS[name] or 3)
    assert read_schedule_csv(format_schedule_csv(s)) == s
    path = tmp_path / "plan.csv"
    write_schedule_csv(s, path)
    assert read_schedule_csv(path) == s
    assert read_schedule_csv(str(path)) == s


def test_hand_written_table() -> None:
    text = """
    # my 1F1B, written by hand
    0,F0,F1,F2,B0,F3,B1,B2,B3,,
    1,F0,F1,B0,F2,B1,F3,B2,B3
    2,F0,B0,F1,B1,F2,B2,F3,B3
    """
    s = read_schedule_csv(text)
    assert s.name == "table" and s.num_microbatches == 4  # inferred from F3
    assert s.actions == one_f_one_b(3, 4).actions


def test_file_name_is_the_default_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("0,F0,B0\n1,F0,B0\n")
    assert read_schedule_csv(path).name == "mine"


def test_explicit_stages_infer_looped_chunks() -> None:
    s = read_schedule_csv("0,0F0,2F0,2B0,0B0\n1,1F0,3F0,3B0,1B0\n")
    assert s.placement == Placement.looped(2, 2)


def test_vshape_header() -> None:
    s = zb_v(2, 3)
    text = format_schedule_csv(s)
    assert text.splitlines()[0] == "# placement=vshape chunks=2 microbatches=3 name=zb-v"
    assert text.splitlines()[1].startswith("0,0F0,0F1,0F2,3F0,3I0,3W0,")
    no_chunks = text.replace(" chunks=2", "")
    assert read_schedule_csv(no_chunks) == s


GOOD = "0,F0,B0\n1,F0,B0\n"


@pytest.mark.parametrize(
    "text,message",
    [
        ("0,F0,B0\n1,F0,B0,X3\n",
         "rank 1, column 4: 'X3' is not an action; write F3, B3, I3, W3 or 2F3, or an "
         "overlapped pair such as \\(2F5;1B3\\)OVERLAP_F_B"),
        ("0,F0,,B0\n1,F0,B0\n", "rank 0, column 3: empty cell between actions; remove it"),
        ("0,F0,B0\nr1,F0,B0\n", "line 2, column 1: 'r1' is not a rank"),
        ("0,F0,B0\n0,F0,B0\n", "rank 0, column 1: rank 0 has two rows \\(lines 1 and 2\\)"),
        ("0,F0,B0\n2,F0,B0\n", "rank 1 has no row; the rows are for ranks 0, 2 and must be 0..1"),
        ("# placement=looped chunks=2\n0,F0,B0\n1,F0,B0\n",
         "rank 0, column 2: 'F0' needs its stage, as rank 0 holds stages 0, 2; write e.g. 0F0"),
        ("0,1F0,B0\n1,F0,B0\n", "rank 0, column 2: stage 1 is on rank 1, not rank 0"),
        ("# chunks=1\n0,F0,B0,5F0\n1,F0,B0\n",
         "rank 0, column 4: stage 5 does not exist; the placement has stages 0..1"),
        ("# microbatches=1\n0,F0,B0,F1\n1,F0,B0\n",
         "rank 0, column 4: microbatch 1 is out of range 0..0 \\(microbatches=1\\)"),
        ("0,F0,B0,F0\n1,F0,B0\n", "rank 0, column 4: 0F0 appears twice \\(also column 2\\)"),
        ("0,F0,B0\n1,F0\n", "rank 1: the table never runs 1B0; add it to rank 1's row"),
        ("0,F0,I0,W0\n1,F0,I0\n", "rank 1: the table never runs 1W0"),
        ("0,F0,W0\n1,F0,B0\n", "rank 0: the table never runs 0I0"),
        ("0,F0,B0,W0\n1,F0,B0\n",
         "rank 0, column 4: 0W0 splits the backward that 0B0 \\(column 3\\) runs whole; keep one "
         "B, or one I and one W"),
        ("0,F0,(F1;W0)OVERLAP_F_B\n1,F0,B0\n",
         "rank 0, column 3: '\\(F1;W0\\)OVERLAP_F_B' is not an overlapped pair; write a forward "
         "then a backward \\(B or I\\)"),
        ("0,F0,0SEND_F0,B0\n1,F0,B0\n",
         "rank 0, column 3: '0SEND_F0' is communication; a table holds compute actions only"),
        ("r0,F0,B0\n1,F0,B0\n", "line 1, column 1: 'r0' is neither a rank nor an action"),
        ("0,F0,B0\n1,B0,F0\n",
         "the table deadlocks, no rank can go on: rank 0, column 3: 0B0 waits for 1B0 \\(rank 1\\); "
         "rank 1, column 2: 1B0 waits for 1F0 \\(rank 1\\)"),
        ("# chunk=2\n" + GOOD, "line 1: unknown setting 'chunk'; use placement=, chunks="),
        ("# placement=vshape chunks=3\n" + GOOD,
         "header: placement=vshape holds 2 chunks per rank, not chunks=3"),
        ("# placement=ring\n" + GOOD, "header: placement='ring' is unknown; use looped or vshape"),
        ("# microbatches=0\n" + GOOD, "header: microbatches='0' must be a positive integer"),
        ("# microbatches=2\n# microbatches=3\n" + GOOD, "line 2: microbatches is set twice"),
        ("# only a comment,\n", "no rows; write one row per rank"),
    ],
)
def test_errors_name_rank_column_and_reason(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=f"^schedule table: {message}"):
        read_schedule_csv(text)


def test_split_backward_and_overlapped_pairs() -> None:
    # stage 0 splits microbatch 0 (I, then W later) and runs microbatch 1 whole; rank 1
    # overlaps the forward of microbatch 1 with the backward of microbatch 0
    text = "0,F0,F1,I0,B1,W0\n1,F0,(F1;B0)OVERLAP_F_B,B1\n"
    s = read_schedule_csv(text)
    assert s.actions == {
        0: (F(0, 0), F(0, 1), I(0, 0), B(0, 1), W(0, 0)),
        1: (F(1, 0), overlap(F(1, 1), B(1, 0)), B(1, 1)),
    }
    assert read_schedule_csv(format_schedule_csv(s)) == s
    assert format_schedule_csv(s).splitlines()[2] == "1,F0,(F1;B0)OVERLAP_F_B,B1"
    # two stages per rank: the pair's halves carry their stages
    v = read_schedule_csv(_DUALPIPEV_2x4)
    text = format_schedule_csv(v)
    assert text.splitlines()[0] == "# placement=vshape chunks=2 microbatches=4 name=table"
    assert ",(0F3;3B1)OVERLAP_F_B," in text.splitlines()[1]
    assert read_schedule_csv(text) == v


def test_deadlock_column_counts_idle_cells_in_torch_form() -> None:
    # torch's form: no rank column, and empty cells are idle steps that still count as columns
    with pytest.raises(ScheduleError, match=r"rank 0, column 3: 0B0 waits for 1B0 \(rank 1\); "
                       r"rank 1, column 2: 1B0 waits for 1F0 \(rank 1\)"):
        read_schedule_csv("0F0,,0B0\n,1B0,1F0\n")


@pytest.mark.parametrize(
    "text,message",
    [
        ("0F0,0B0\n1F0,X0\n", "rank 1, column 2: 'X0' is not an action; write torch's action "
                              "strings such as 0F3"),
        ("0F0,F1\n1F0,1B0\n", "rank 0, column 2: 'F1' needs its stages in torch's form"),
        ("0F0,0B0,1F0\n1F0,1B0\n",
         "rank 1, column 1: stage 1 is also run by rank 0 \\(column 3\\); a stage lives on one rank"),
        ("0F0,0B0\n2F0,2B0\n", "stage 1 appears on no row; the rows run stages up to 2"),
        ("0F0,0B0,1F0,1B0\n,,\n", "rank 1 runs no stage"),
        ("# placement=vshape\n0F0,0B0\n1F0,1B0\n",
         "header: placement=vshape disagrees with the rows, which place stages on "
         "ranks \\(0, 1\\) \\(looped\\)"),
        ("0F0,0RECV_B0,0B0\n1F0,1B0\n", "rank 0, column 2: '0RECV_B0' is communication"),
        ("# chunks=2\n0F0,0B0\n1F0,1B0\n", "header: chunks=2 disagrees with the rows"),
    ],
)
def test_torch_form_errors(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=f"^schedule table: {message}"):
        read_schedule_csv(text)


@pytest.mark.parametrize("name", sorted(SCHEDULE_CHUNKS))
def test_torch_style_round_trip(name: str, tmp_path: Path) -> None:
    s = build_schedule(name, 3, 6 if name == "dualpipev" else 5, SCHEDULE_CHUNKS[name] or 3)
    text = format_schedule_csv(s, style="torch")
    assert text.splitlines()[0].split(",")[:2] == [str(a) for a in s.actions[0][:2]]  # no rank
    back = read_schedule_csv(text)
    assert (back.actions, back.placement, back.num_microbatches) == (
        s.actions, s.placement, s.num_microbatches,
    )
    write_schedule_csv(s, tmp_path / "mine.csv", style="torch")
    assert read_schedule_csv(tmp_path / "mine.csv").name == "mine"


def test_torch_form_takes_name_and_microbatches_from_comments() -> None:
    s = read_schedule_csv("# name=mine microbatches=2\n0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n")
    assert (s.name, s.num_microbatches, s.placement) == ("mine", 2, Placement.looped(2))
    with pytest.raises(ScheduleError, match="rank 0: the table never runs 0F2"):
        read_schedule_csv("# microbatches=3\n0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n")


def test_torch_style_states_any_placement() -> None:
    odd = Schedule.build("odd", 1, Placement((1, 0)), {
        0: [Action.parse("1F0"), Action.parse("1B0")], 1: [Action.parse("0F0"), Action.parse("0B0")],
    })
    assert format_schedule_csv(odd, style="torch") == "1F0,1B0\n0F0,0B0\n"
    assert read_schedule_csv(format_schedule_csv(odd, style="torch")).placement == Placement((1, 0))
    with pytest.raises(ScheduleError, match="style='csv' is unknown; use 'conveyor' or 'torch'"):
        format_schedule_csv(odd, style="csv")  # type: ignore[arg-type]


# -- interop with torch.distributed.pipelining (tests may import torch; schedules/ may not) --


def _torch_stages(num_ranks: int, num_stages: int, rank: int = 0) -> list[SimpleNamespace]:
    """Stand-ins for rank ``rank``'s PipelineStages: what torch's schedules read at construction.

    Building a torch schedule (and loading a CSV into it) needs no process group: it
    reads sizes and the rank off its stages and computes every rank's pipeline_order.
    """
    import torch

    return [
        SimpleNamespace(num_stages=num_stages, group_size=num_ranks, group_rank=rank,
                        submod=torch.nn.Identity(), stage_index=rank + i * num_ranks)
        for i in range(num_stages // num_ranks)
    ]


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "zb-h1", "zb-h2", "zb-v", "interleaved-1f1b"])
@pytest.mark.parametrize("p,m", [(2, 3), (4, 8)])
def test_conveyor_table_loads_in_torch(name: str, p: int, m: int, tmp_path: Path) -> None:
    from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime

    s = build_schedule(name, p, m, SCHEDULE_CHUNKS[name] or 2)
    path = tmp_path / "conveyor.csv"
    write_schedule_csv(s, path, style="torch")
    # every cell is torch's action, row by row
    for rank, line in enumerate(path.read_text().splitlines()):
        assert [str(_Action.from_str(c)) for c in line.split(",")] == [str(a) for a in s.actions[rank]]
    # torch's own loader: it validates coverage and order, infers the stage-to-rank map
    # and lowers the schedule with its sends and receives (which fails on a deadlock)
    theirs = _PipelineScheduleRuntime(_torch_stages(p, s.num_stages), m, loss_fn=lambda y, t: y)
    theirs._load_csv(str(path))
    assert {r: [str(a) for a in row] for r, row in theirs.pipeline_order.items()} == {
        r: [str(a) for a in acts] for r, acts in s.actions.items()
    }
    assert theirs.stage_index_to_group_rank == dict(enumerate(s.placement.stage_to_rank))
    assert set(theirs.pipeline_order_with_comms) == set(range(p))


def test_conveyor_pairs_load_in_torch(tmp_path: Path) -> None:
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    s = read_schedule_csv(_DUALPIPEV_2x4)
    path = tmp_path / "pairs.csv"
    write_schedule_csv(s, path, style="torch")
    theirs = _PipelineScheduleRuntime(_torch_stages(2, 4), 4, loss_fn=lambda y, t: y)
    theirs._load_csv(str(path))
    assert [str(a) for a in theirs.pipeline_order[0]] == [str(a) for a in s.actions[0]]
    assert theirs.stage_index_to_group_rank == {0: 0, 1: 1, 2: 1, 3: 0}


# torch's ScheduleDualPipeV for 2 ranks and 4 microbatches, as its _dump_csv writes it
_DUALPIPEV_2x4 = (
    "0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,(3F2;0B0)OVERLAP_F_B,3B2,"
    "(3F3;0B1)OVERLAP_F_B,3B3,0I2,0W2,0I3,0W3\n"
    "1F0,2F0,1F1,2F1,1F2,2B0,(2F2;1B0)OVERLAP_F_B,(1F3;2B1)OVERLAP_F_B,(2F3;1B1)OVERLAP_F_B,"
    "2B2,1B2,2I3,1I3,2W3,1W3\n"
)


@pytest.mark.parametrize(
    "cls,chunks,m",
    [
        ("ScheduleZBVZeroBubble", 2, 8),
        ("ScheduleDualPipeV", 2, 8),
        ("ScheduleInterleavedZeroBubble", 2, 8),
        ("ScheduleInterleavedZeroBubble", 3, 4),
        ("ScheduleInterleaved1F1B", 2, 8),
        ("ScheduleLoopedBFS", 2, 5),
    ],
)
def test_torch_dump_loads_in_conveyor(cls: str, chunks: int, m: int, tmp_path: Path) -> None:
    from torch.distributed.pipelining import schedules as torch_schedules

    if not hasattr(torch_schedules, cls):
        pytest.skip(f"this torch has no {cls}")
    p = 4
    theirs = getattr(torch_schedules, cls)(_torch_stages(p, p * chunks), m, loss_fn=lambda y, t: y)
    path = tmp_path / "torch.csv"
    theirs._dump_csv(str(path), format="compute_only")  # idle steps are empty cells
    s = read_schedule_csv(path)
    validate(s)
    assert s.num_microbatches == m and s.num_ranks == p
    assert dict(enumerate(s.placement.stage_to_rank)) == theirs.stage_index_to_group_rank
    assert {r: [str(a) for a in acts] for r, acts in s.actions.items()} == {
        r: [str(a) for a in row if a is not None] for r, row in theirs.pipeline_order.items()
    }
    if cls == "ScheduleZBVZeroBubble":
        assert s.actions == zb_v(p, m).actions  # the same ZB-V, action for action
    if cls == "ScheduleDualPipeV":
        kinds = {a.kind for acts in s.actions.values() for a in acts}
        assert {Kind.B, Kind.I, Kind.W, Kind.OVERLAP_F_B} <= kinds


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="cannot read schedule table .*nope.csv"):
        read_schedule_csv(tmp_path / "nope.csv")


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("0,F0,B0\n1,F0,Q0\n")
    with pytest.raises(ScheduleError, match=r"bad.csv': rank 1, column 3: 'Q0' is not an action"):
        read_schedule_csv(path)


def test_writer_refuses_what_a_table_cannot_hold() -> None:
    with pytest.raises(ScheduleError, match="is lowered; write the table before lower"):
        format_schedule_csv(lower(one_f_one_b(2, 2)))
    odd = Schedule.build("odd", 1, Placement((1, 0)), {0: ["1F0", "1B0"], 1: ["0F0", "0B0"]})
    with pytest.raises(ScheduleError, match=r"placement \(1, 0\), which a table cannot state"):
        format_schedule_csv(odd)
