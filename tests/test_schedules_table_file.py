"""Schedules as CSV tables: round trips, and every error names rank, column and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.schedules import (
    SCHEDULE_CHUNKS,
    Placement,
    Schedule,
    ScheduleError,
    build_schedule,
    format_schedule_csv,
    lower,
    one_f_one_b,
    read_schedule_csv,
    write_schedule_csv,
    zb_v,
)


@pytest.mark.parametrize("name", sorted(SCHEDULE_CHUNKS))
@pytest.mark.parametrize("p,m", [(1, 1), (3, 5), (4, 8)])
def test_round_trip(name: str, p: int, m: int, tmp_path: Path) -> None:
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
    assert text.splitlines()[1].startswith("0,0F0,0F1,0F2,3F0,3B0,3W0,")
    no_chunks = text.replace(" chunks=2", "")
    assert read_schedule_csv(no_chunks) == s


GOOD = "0,F0,B0\n1,F0,B0\n"


@pytest.mark.parametrize(
    "text,message",
    [
        ("0,F0,B0\n1,F0,B0,X3\n",
         "rank 1, column 4: 'X3' is not an action; write F3, B3, W3 or 2F3"),
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
        ("0,F0,B0,W0\n1,F0,B0\n", "rank 1: the table never runs 1W0"),
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
