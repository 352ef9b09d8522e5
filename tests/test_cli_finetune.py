"""`conveyor finetune` and `conveyor predict` end to end through ``conveyor.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.config import ConfigError, ModelConfig
from conveyor.train.checkpoint import read_meta, resolve_checkpoint
from conveyor.train.metrics import eval_rows, read_metrics

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2"]
LOOP = ["--batch-size", "8", "--microbatches", "2", "--warmup", "0"]


def _pretrain(runs: Path, family: str, corpus: Path, name: str) -> None:
    """One step of a tiny model's pretraining: the start of a fine-tuning run."""
    assert main(["train", "--family", family, "--data", str(corpus), *TINY, "--steps", "1",
                 "--eval-every", "0", "--run-dir", str(runs), "--name", name]) == 0


def _records(path: Path, n: int, *, seq2seq: bool = False) -> Path:
    words = ["alpha", "beta", "gamma", "delta"]
    rows = [{"source": f"{words[i % 4]} {words[(i + 1) % 4]}", "target": words[i % 4]}
            if seq2seq else {"text": f"{words[i % 4]} and {words[i % 3]}", "label": words[i % 3]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.multiprocess
def test_finetune_a_classifier_at_pp2_then_predict_and_resume(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    _pretrain(runs, "bert", corpus, "base")
    task = _records(tmp_path / "task.jsonl", 48)
    assert main(["finetune", "--checkpoint", str(runs / "base"), "--task", str(task),
                 "--pp", "2", "--steps", "2", *LOOP, "--eval-every", "1", "--val-fraction",
                 "0.34", "--run-dir", str(runs), "--name", "ft"]) == 0
    assert "conveyor predict" in capsys.readouterr().out
    run = runs / "ft"
    evals = eval_rows(read_metrics(run / "metrics.jsonl"))
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert {"val_accuracy", "val_macro_f1", "majority_accuracy", "majority_macro_f1"} <= set(evals[0])
    assert main(["report", str(run)]) == 0  # draws the task metrics of a classifier
    assert "val accuracy" in capsys.readouterr().out
    meta = read_meta(resolve_checkpoint(run))
    assert meta["task"]["labels"] == ["alpha", "beta", "gamma"]
    assert meta["model"]["num_labels"] == 3 and meta["model"]["family"] == "bert"

    # predictions through 2 stages and 1 agree; unlabelled and labelled inputs both work
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "alpha and beta"}\n{"text": "gamma", "label": "beta"}\n'
                      '{"text": "delta and delta"}\n')
    got = {}
    for pp in ("1", "2"):
        out = tmp_path / f"pred{pp}.jsonl"
        assert main(["predict", "--checkpoint", str(run), "--input", str(inputs), "--pp", pp,
                     "--out", str(out)]) == 0
        got[pp] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in got["2"]] == [0, 1, 2]
    for a, b in zip(got["1"], got["2"], strict=True):
        assert a["label"] == b["label"] and a["label"] in ("alpha", "beta", "gamma")
        for label, p in a["probabilities"].items():
            assert p == pytest.approx(b["probabilities"][label], abs=1e-5)
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    # --resume continues the fine-tuning run, its task read from the checkpoint
    assert main(["finetune", "--resume", str(run), "--steps", "3", "--run-dir", str(runs),
                 "--name", "ft2", "--eval-every", "0"]) == 0
    assert [r["step"] for r in eval_rows(read_metrics(runs / "ft2" / "metrics.jsonl"))] == [
        0, 1, 2, 3]
    capsys.readouterr()

    # --init: an exported model starts a fine-tuning run as its checkpoint does
    assert main(["export", "--checkpoint", str(runs / "base"), "--out", str(tmp_path / "exp")]) == 0
    assert main(["finetune", "--init", str(tmp_path / "exp"), "--task", str(task), "--steps",
                 "1", *LOOP, "--eval-every", "0", "--val-fraction", "0.34", "--run-dir", str(runs),
                 "--name", "ft3"]) == 0
    first = eval_rows(read_metrics(runs / "ft3" / "metrics.jsonl"))[0]
    assert first["val_loss"] == pytest.approx(evals[0]["val_loss"], abs=1e-5)  # same weights
    capsys.readouterr()

    # user mistakes: one line, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "omega"}\n')
    seq = _records(tmp_path / "seq.jsonl", 20, seq2seq=True)
    for argv, message in [
        (["predict", "--checkpoint", str(run), "--input", str(bad)], "unseen in training"),
        (["predict", "--checkpoint", str(runs / "base"), "--text", "x"], "no fine-tuned classifier"),
        (["finetune", "--checkpoint", str(runs / "base"), "--task", str(seq)], "has no decoder"),
        (["finetune", "--checkpoint", str(runs / "base")], "pass --task"),
        (["eval", "--checkpoint", str(run)], "is fine-tuned on task"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_finetune_a_summariser_at_pp2_scores_its_generations(
        family: str, tmp_path: Path, corpus: Path) -> None:
    runs = tmp_path / "runs"
    _pretrain(runs, family, corpus, "gpt")
    task = _records(tmp_path / "seq.jsonl", 40, seq2seq=True)
    assert main(["finetune", "--checkpoint", str(runs / "gpt"), "--task", str(task), "--pp", "2",
                 "--steps", "1", *LOOP, "--eval-every", "0", "--val-fraction", "0.25",
                 "--target-len", "8", "--truncate", "--generate", "3", "--run-dir", str(runs),
                 "--name", "doc"]) == 0
    first, last = eval_rows(read_metrics(runs / "doc" / "metrics.jsonl"))
    assert {"val_loss", "val_ppl", "val_token_accuracy"} <= set(first)
    assert "val_bleu" not in first  # generation runs at the last evaluation only
    assert 0 <= last["val_bleu"] <= 100 and 0 <= last["val_rouge_l"] <= 1


@pytest.mark.multiprocess
def test_t5_learns_a_classification_task_text_to_text(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    _pretrain(runs, "t5", corpus, "t5")
    task = _records(tmp_path / "task.jsonl", 48)
    assert main(["finetune", "--checkpoint", str(runs / "t5"), "--task", str(task), "--pp", "2",
                 "--steps", "1", *LOOP, "--eval-every", "0", "--val-fraction", "0.34",
                 "--target-len", "8", "--generate", "8", "--run-dir", str(runs),
                 "--name", "cls"]) == 0
    first, last = eval_rows(read_metrics(runs / "cls" / "metrics.jsonl"))
    assert "val_token_accuracy" in first and "val_accuracy" not in first  # generated at the end
    assert 0 <= last["val_accuracy"] <= 1 and 0 <= last["val_unknown_label"] <= 1
    assert last["majority_accuracy"] > 0
    meta = read_meta(resolve_checkpoint(runs / "cls"))
    assert meta["task"]["text_to_text"] and meta["model"]["num_labels"] == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(runs / "cls"), "--text", "alpha"]) == 2
    err = capsys.readouterr().err.strip()
    assert "text-to-text" in err and len(err.splitlines()) == 1
    # block costs profiled on this machine cover decoder LMs only: said, not ignored
    assert main(["finetune", "--checkpoint", str(runs / "t5"), "--task", str(task),
                 "--partition-costs", "profile", "--steps", "1", *LOOP, "--val-fraction", "0.34",
                 "--run-dir", str(runs),
                 "--name", "profiled"]) == 2
    assert "family='t5' uses partition_costs='analytic'" in capsys.readouterr().err


def test_generate_refuses_a_classifier() -> None:
    from argparse import Namespace

    from conveyor.commands.generate import _check_sizes

    with pytest.raises(ConfigError, match="classifier .* has no LM head"):
        _check_sizes(Namespace(), ModelConfig(vocab_size=320, num_labels=3))
