"""`conveyor train`, `eval` and `report` end to end through ``conveyor.cli.main`` on a tiny corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conveyor.cli import build_parser, main
from conveyor.commands.train import build_run_config
from conveyor.data import load_tokenizer
from conveyor.train.metrics import eval_rows, read_metrics, train_rows

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2"]


@pytest.mark.multiprocess
def test_train_then_eval_then_report(tmp_path: Path, corpus: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    argv = ["train", "--data", str(corpus), "--pp", "2", *TINY, "--steps", "12", "--lr", "1e-2",
            "--warmup", "2", "--eval-every", "6", "--eval-batches", "2",
            "--checkpoint-every", "6", "--run-dir", str(runs), "--name", "cli"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val loss drop" in out and "conveyor report" in out
    run = runs / "cli"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000006", "step-00000012"]
    assert load_tokenizer(run / "tokenizer.json").vocab_size <= 320
    config = json.loads((run / "config.json").read_text())
    assert config["parallel"]["pp"] == 2 and config["model"]["n_layers"] == 2
    assert config["data"]["paths"] == [str(corpus)]
    rows = read_metrics(run / "metrics.jsonl")
    train, evals = train_rows(rows), eval_rows(rows)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert set(train[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert set(evals[0]) == {"step", "val_loss", "val_ppl"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals
    assert sum(r["loss"] for r in train[-3:]) / 3 < train[0]["loss"] - 0.5

    # the checkpoint evaluated through another layout gives the same validation loss
    assert main(["eval", "--checkpoint", str(run), "--pp", "1", "--microbatches", "1",
                 "--batches", "2"]) == 0
    got = float(re.search(r"val_loss (\S+)", capsys.readouterr().out)[1])
    assert got == pytest.approx(evals[-1]["val_loss"], abs=1e-4)

    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "first val loss" in out and "wall time" in out
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rank's user error (here a corrupt shard) still ends in one line and exit 2
    shard = next((run / "checkpoints" / "step-00000012").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"garbage!")
    assert main(["eval", "--checkpoint", str(run), "--pp", "1", "--microbatches", "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[rank")]
    assert len(err) == 1 and "corrupt" in err[0] and "Traceback" not in err[0], err


@pytest.mark.multiprocess
def test_train_with_cost_partition_logs_its_layout(tmp_path: Path, corpus: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # vocab 1024 on d_model 32: the head weighs ~2.6 layers, so `cost` moves a layer off it
    argv = ["train", "--data", str(corpus), "--pp", "2", *TINY, "--layers", "4",
            "--vocab-size", "1024", "--partition", "cost", "--steps", "2", "--val-fraction", "0",
            "--checkpoint-every", "0", "--run-dir", str(tmp_path / "runs"), "--name", "cost"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "partition cost [0:4 | 4:6]" in err, err
    assert "stage 1 on rank 1: blocks 4:6 (layer 3 + head)" in err
    config = json.loads((tmp_path / "runs" / "cost" / "config.json").read_text())
    assert config["parallel"]["partition"] == "cost"


@pytest.mark.multiprocess
def test_train_can_balance_blocks_timed_on_this_machine(tmp_path: Path, corpus: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", str(corpus), "--pp", "2", *TINY, "--layers", "4",
            "--vocab-size", "1024", "--partition-costs", "profile", "--steps", "1",
            "--val-fraction", "0", "--checkpoint-every", "0", "--run-dir", str(tmp_path / "runs"),
            "--name", "timed"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "forward + backward of each block timed here" in err, err
    assert "partition cost [" in err


@pytest.mark.multiprocess
def test_train_with_tensor_parallelism_then_eval_unsharded(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    argv = ["train", "--data", str(corpus), "--tp", "2", "--sequence-parallel", *TINY,
            "--steps", "2", "--eval-batches", "2", "--run-dir", str(runs), "--name", "tp"]
    assert main(argv) == 0
    assert "layout: pp=1 x dp=1 x tp=2 (sequence parallel) = 2 ranks" in capsys.readouterr().err
    config = json.loads((runs / "tp" / "config.json").read_text())
    assert config["parallel"]["tp"] == 2 and config["parallel"]["sequence_parallel"]
    last = eval_rows(read_metrics(runs / "tp" / "metrics.jsonl"))[-1]["val_loss"]
    # the checkpoint holds logical tensors: one process evaluates it to the same loss
    assert main(["eval", "--checkpoint", str(runs / "tp"), "--tp", "1", "--batches", "2"]) == 0
    got = float(re.search(r"val_loss (\S+)", capsys.readouterr().out)[1])
    assert got == pytest.approx(last, abs=1e-4)


def test_toml_config_and_flags_override_it(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[model]\nn_layers = 6\nd_model = 64\n[parallel]\npp = 2\nschedule = 'gpipe'\n"
        "[train]\nsteps = 50\nlr = 1e-3\n[data]\npaths = ['a.txt', 'b.txt']\n"
    )
    args = build_parser().parse_args(["train", "--config", str(cfg), "--layers", "3", "--lr", "0.01"])
    run = build_run_config(args)
    assert run.model.n_layers == 3 and run.model.d_model == 64  # flag beats file beats default
    assert run.model.vocab_size == 4096  # the train command's default model
    assert run.parallel.schedule == "gpipe" and run.parallel.pp == 2
    assert run.train.steps == 50 and run.train.lr == 0.01
    assert run.data.paths == ("a.txt", "b.txt")
    assert run.parallel.lend_cores is False  # off unless asked for
    lend = build_run_config(build_parser().parse_args(["train", "--config", str(cfg), "--lend-cores"]))
    assert lend.parallel.lend_cores is True


def test_help_explains_every_option_and_the_default_corpus(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--layers", "--kv-heads", "--tie-embeddings", "--virtual-stages", "--recompute",
                 "--partition", "--min-lr", "--grad-clip", "--checkpoint-every", "--keep",
                 "--bf16", "--resume", "--val-fraction", "--config", "--tp",
                 "--sequence-parallel", "--lend-cores"):
        assert flag in text
    assert "standard library" in text and "(default: 1f1b)" in text
