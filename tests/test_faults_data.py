"""What checkpoints and metrics keep through moves, edits and full disks: every RNG state,
the tokenizer by relative path and hash, the corpus fingerprint, whole metrics lines."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conveyor.cli import main
from conveyor.config import ModelConfig, to_dict
from conveyor.data import DataError, PreparedData, read_documents, train_tokenizer
from conveyor.models import Transformer
from conveyor.train.checkpoint import save_checkpoint
from conveyor.train.metrics import MetricsWriter, read_metrics
from conveyor.train.resume_checks import check_same_data, data_provenance
from conveyor.train.rng import capture_rng, restore_rng

CFG = ModelConfig(vocab_size=320, n_layers=1, d_model=32, n_heads=2, max_seq_len=32)


def _draws() -> list[float]:
    return [torch.rand(1).item(), random.random(), float(np.random.rand())]


def test_every_generator_is_restored() -> None:
    saved = json.loads(json.dumps(capture_rng()))  # as it travels through meta.json
    first = _draws()
    _draws()
    restore_rng(saved)
    assert _draws() == first


@pytest.fixture
def run(tmp_path: Path, corpus: Path) -> tuple[Path, PreparedData]:
    """A run directory as `conveyor train` leaves it, with one checkpoint."""
    docs = read_documents(sorted(corpus.iterdir()))
    tok = train_tokenizer(docs, CFG.vocab_size, tmp_path / "cache")
    data = PreparedData(tokenizer=tok, train=np.zeros((1, 2)), val=np.zeros((1, 2)), skipped=0,
                        fingerprint=docs.fingerprint)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    tok.save(run_dir / "tokenizer.json")
    cfg = ModelConfig(**{**to_dict(CFG), "vocab_size": tok.vocab_size})
    tensors = {k: v.clone() for k, v in Transformer(cfg, seed=0).state_dict().items()}
    save_checkpoint(run_dir, 1, tensors=tensors,
                    meta={"model": to_dict(cfg), **data_provenance(data)})
    return run_dir, data


def test_a_moved_run_still_generates_and_a_swapped_tokenizer_is_caught(
        run: tuple[Path, PreparedData], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(str(run[0]), moved)
    args = ["generate", "--checkpoint", str(moved), "--prompt", "stage", "--max-new-tokens", "3"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("stage")
    (moved / "tokenizer.json").write_text((moved / "tokenizer.json").read_text() + " ")
    assert main(args) == 2
    assert "is not the tokenizer checkpoint" in capsys.readouterr().err


def test_resume_checks_corpus_and_tokenizer(run: tuple[Path, PreparedData]) -> None:
    run_dir, data = run
    ckpt = run_dir / "checkpoints" / "step-00000001"
    meta = json.loads((ckpt / "meta.json").read_text())
    check_same_data(data, ckpt, meta)  # the same data: nothing to say
    changed = PreparedData(**{**data.__dict__, "fingerprint": "0" * 64})
    with pytest.raises(DataError, match="--data files changed since checkpoint"):
        check_same_data(changed, ckpt, meta)
    other = {**meta, "tokenizer_sha256": "0" * 64}
    with pytest.raises(DataError, match="different tokenizer"):
        check_same_data(data, ckpt, other)


def test_metrics_lines_are_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write({"step": 1, "loss": 2.0})
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 4:
            real_write(fd, data[: len(data) // 2])
            return len(data) // 2
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DataError, match="cannot write .*No space left on device; free disk"):
        writer.write({"step": 2, "loss": 1.0})
    monkeypatch.undo()
    writer.close()
    assert path.read_bytes() == before  # the half line was cut back
    path.write_bytes(before + b'{"step": 2, "lo')  # a torn line from an older writer
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line() -> None:
    writer = MetricsWriter(Path("/dev/full"))
    with pytest.raises(DataError, match="No space left"):
        writer.write({"step": 1, "loss": 1.0})
    writer.close()


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs (root and mount(8) needed; skipped otherwise)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.multiprocess
def test_a_full_disk_during_training_and_data_preparation(
        tiny_disk: Path, tmp_path: Path, corpus: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--data", str(corpus), "--layers", "2", "--d-model", "32", "--heads", "2",
            "--vocab-size", "320", "--seq-len", "16", "--batch-size", "8", "--microbatches", "2",
            "--val-fraction", "0", "--steps", "4", "--checkpoint-every", "2", "--keep", "0"]
    # the run directory fills up at the second checkpoint (each is about 0.6 MB)
    assert main([*args, "--run-dir", str(tiny_disk), "--cache-dir", str(tmp_path / "cache"),
                 "--name", "full"]) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("conveyor train:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "earlier checkpoints are untouched" in lines[0]
    first = tiny_disk / "full" / "checkpoints" / "step-00000002"
    from conveyor.train.checkpoint_files import check_checkpoint

    check_checkpoint(first, {})  # intact, resumable
    assert read_metrics(tiny_disk / "full" / "metrics.jsonl")  # whole rows, no torn line
    # preparing data on a full disk: one line too
    (tiny_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(tiny_disk).free)
    assert main([*args, "--run-dir", str(tmp_path / "runs"), "--cache-dir",
                 str(tiny_disk / "cache")]) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("conveyor train:")]
    assert "Traceback" not in err and len(lines) == 1 and "No space left" in lines[0], err
