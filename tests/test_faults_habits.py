"""Habits users bring from other tools: TensorBoard scalars, Parquet/Arrow data, and progress
as log lines when stderr is not a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.data import DataError, read_documents
from conveyor.train.metrics import eval_rows, read_metrics, train_rows

TEXTS = ["first document of the table.", "", "second one, longer than the first."]


def test_parquet_and_arrow_text_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "text": TEXTS})
    pq.write_table(table, tmp_path / "a.parquet")
    feather.write_feather(table, tmp_path / "b.arrow")  # the Arrow IPC file format
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink:  # the stream format (HF datasets)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    for name in ("a.parquet", "b.arrow", "c.arrow"):
        assert read_documents([tmp_path / name]).documents == [TEXTS[0], TEXTS[2]]
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"has no \"text\" column \(columns: body\)"):
        read_documents([tmp_path / "d.parquet"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="type int64"):
        read_documents([tmp_path / "e.parquet"])
    (tmp_path / "f.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read table"):
        read_documents([tmp_path / "f.parquet"])


@pytest.mark.multiprocess
def test_tensorboard_scalars_and_log_line_progress(tmp_path: Path, corpus: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    assert main(["train", "--data", str(corpus), "--layers", "2", "--d-model", "32", "--heads",
                 "2", "--vocab-size", "320", "--seq-len", "16", "--batch-size", "8",
                 "--microbatches", "2", "--steps", "10", "--eval-every", "5", "--eval-batches",
                 "1", "--checkpoint-every", "0", "--tensorboard", "--run-dir", str(runs),
                 "--name", "tb"]) == 0
    err = capfd.readouterr().err  # not a terminal: no bar, a log line every tenth of the run
    assert "step 3/10  loss " in err and " tok/s  eta " in err
    rows = read_metrics(runs / "tb" / "metrics.jsonl")
    events = EventAccumulator(str(runs / "tb" / "tensorboard"))
    events.Reload()
    for tag, key, kept in [("train/loss", "loss", train_rows), ("train/lr", "lr", train_rows),
                           ("train/grad_norm", "grad_norm", train_rows),
                           ("train/tokens_per_s", "tokens_per_s", train_rows),
                           ("val/loss", "val_loss", eval_rows), ("val/ppl", "val_ppl", eval_rows)]:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in kept(rows)], tag
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in kept(rows)]), tag
