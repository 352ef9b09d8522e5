"""`conveyor train --family bert|t5`: pretraining each family with pp=2 through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.train.metrics import eval_rows, read_metrics, train_rows

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_family_pretrains_with_pp2_resumes_and_evaluates_under_another_layout(
    family: str, tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = ["train", "--family", family, "--data", str(corpus), "--pp", "2", *TINY,
            "--steps", "8", "--lr", "1e-2", "--warmup", "1", "--eval-every", "0",
            "--eval-batches", "1", "--checkpoint-every", "5", "--run-dir", str(runs)]
    assert main([*argv, "--name", family]) == 0
    run = runs / family
    assert json.loads((run / "config.json").read_text())["model"]["family"] == family
    rows = read_metrics(run / "metrics.jsonl")
    train, evals = train_rows(rows), eval_rows(rows)
    assert len(train) == 8 and [r["step"] for r in evals] == [0, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    # a masked LM also reports its own accuracy and perplexity (MLM term alone, below
    # the MLM + NSP loss's), through the pipeline's predictions
    mlm = {"val_mlm_accuracy", "val_mlm_ppl"}
    assert (mlm <= set(evals[-1])) == (family == "bert")
    if family == "bert":
        assert 0 <= evals[-1]["val_mlm_accuracy"] <= 1
        assert evals[-1]["val_mlm_ppl"] < evals[-1]["val_ppl"]
    # masks are seeded by (seed, step): a resumed run draws the same ones, bit for bit
    assert main([*argv, "--name", "resumed",
                 "--resume", str(run / "checkpoints" / "step-00000005")]) == 0
    resumed = train_rows(read_metrics(runs / "resumed" / "metrics.jsonl"))
    after = [r["loss"] for r in resumed if r["step"] > 5]
    assert after == [r["loss"] for r in train[5:]] and len(after) == 3
    capsys.readouterr()
    # the same validation masks (seeded by the run's seed) through one process
    assert main(["eval", "--checkpoint", str(run), "--pp", "1", "--microbatches", "1",
                 "--batches", "1"]) == 0
    got = float(re.search(r"val_loss (\S+)", capsys.readouterr().out)[1])
    assert got == pytest.approx(evals[-1]["val_loss"], abs=1e-4)
