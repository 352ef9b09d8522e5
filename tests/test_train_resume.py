"""Invariant 2 through the trainer: a resumed run continues exactly as if it never stopped.

Same layout: every loss bit-identical. Another layout (pp=2 -> pp=4 -> pp=2, tied
embeddings split differently each time; pp=2 x tp=2 -> one process -> pp=2 x tp=2;
pp=2 x tp=2 -> tp=4 -> dp=2 x pp=2 with ZeRO-1):
losses within 1e-5 relative, because the checkpoint holds logical tensors by
parameter name, not shards by rank. ZeRO-1 (dp=2) trains like one process and its
checkpoints (AdamW state gathered over dp) resume with or without it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from conveyor.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from conveyor.train.metrics import read_metrics, train_rows
from conveyor.train.trainer import run_training

pytestmark = pytest.mark.multiprocess

MODEL = ModelConfig(vocab_size=320, n_layers=2, d_model=32, n_heads=4, max_seq_len=16,
                    tie_embeddings=True)
WORDS = ("stage rank sends activations forward while gradients flow back through the "
         "pipeline and every microbatch waits its turn").split()


def write_corpus(root: Path, files: int = 4, lines: int = 150) -> Path:
    """A small, learnable text corpus: sentences of words from a short list."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
            for _ in range(lines)
        )
        (root / f"doc{i}.txt").write_text(text)
    return root


def _run(tmp: Path, name: str, pp: int, resume: Path | None = None,
         checkpoint_every: int = 3, tp: int = 1, steps: int = 6, dp: int = 1,
         zero: int = 0) -> dict[int, dict[str, Any]]:
    run = RunConfig(
        model=MODEL,
        parallel=ParallelConfig(pp=pp, tp=tp, dp=dp, zero=zero, microbatches=2),
        train=TrainConfig(steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=0,
                          eval_batches=1, checkpoint_every=checkpoint_every, keep=0,
                          run_dir=str(tmp / "runs"), name=name,
                          resume=str(resume) if resume else None),
        data=DataConfig(paths=(str(tmp / "corpus"),), val_fraction=0.1),
    )
    return run_training(run)


def _ckpt(tmp: Path, name: str, step: int) -> Path:
    """The step-``step`` checkpoint of run ``name``."""
    return tmp / "runs" / name / "checkpoints" / f"step-{step:08d}"


def _losses(results: dict[int, dict[str, Any]]) -> list[float]:
    """The step losses, after checking that every rank reports the same ones."""
    first = results[0]["losses"]
    for rank, summary in results.items():
        assert summary["losses"] == first, f"rank {rank} reports other losses than rank 0"
    return first


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    tmp = tmp_path_factory.mktemp("resume")
    write_corpus(tmp / "corpus")
    results = _run(tmp, "straight", pp=2)
    losses = _losses(results)
    assert len(losses) == 6
    return tmp, losses


def test_resume_is_bit_identical(straight: tuple[Path, list[float]]) -> None:
    tmp, losses = straight
    ckpt = tmp / "runs" / "straight" / "checkpoints" / "step-00000003"
    resumed = _losses(_run(tmp, "resumed", pp=2, resume=ckpt))
    assert resumed == losses[3:]  # exact float equality, step by step
    # the resumed run's metrics hold the whole curve: copied up to step 3, then its own
    rows = train_rows(read_metrics(tmp / "runs" / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == losses


def test_resume_into_another_pipeline_layout(straight: tuple[Path, list[float]]) -> None:
    tmp, losses = straight
    ckpt = tmp / "runs" / "straight" / "checkpoints" / "step-00000003"
    # pp=2 -> pp=4: the head (and its copy of the tied embedding) moves to rank 3
    wide = _losses(_run(tmp, "wide", pp=4, resume=ckpt, checkpoint_every=1))
    assert wide == pytest.approx(losses[3:], rel=1e-5, abs=0)
    # and back: a checkpoint saved by 4 ranks resumes on 2
    back_ckpt = tmp / "runs" / "wide" / "checkpoints" / "step-00000004"
    back = _losses(_run(tmp, "back", pp=2, resume=back_ckpt))
    assert back == pytest.approx(losses[4:], rel=1e-5, abs=0)


def test_resume_keeps_the_model(straight: tuple[Path, list[float]]) -> None:
    from conveyor.config import ConfigError

    tmp, _ = straight
    ckpt = tmp / "runs" / "straight"
    run = RunConfig(
        model=dataclasses.replace(MODEL, d_model=64),
        parallel=ParallelConfig(pp=2, microbatches=2),
        train=TrainConfig(steps=8, batch_size=8, run_dir=str(tmp / "runs"), resume=str(ckpt)),
        data=DataConfig(paths=(str(tmp / "corpus"),), val_fraction=0.1),
    )
    with pytest.raises(ConfigError, match="model config differs in d_model"):
        run_training(run)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """One process, and pp=2 x tp=2 (checkpoints at steps 2 and 4): 4 steps each, equal."""
    tmp = tmp_path_factory.mktemp("tp")
    write_corpus(tmp / "corpus")
    single = _losses(_run(tmp, "single", pp=1, steps=4, checkpoint_every=2))
    # pp=2 x tp=2 trains like one process (AdamW, clipping, tied embedding split 4 ways)
    sharded = _losses(_run(tmp, "sharded", pp=2, tp=2, steps=4, checkpoint_every=2))
    assert sharded == pytest.approx(single, rel=1e-5, abs=0)
    return tmp, single


def test_tensor_parallel_checkpoints_resume_under_any_tp(tp_runs: tuple[Path, list[float]]) -> None:
    tmp, single = tp_runs
    # the step-2 checkpoint of pp=2 x tp=2 (logical tensors, gathered over tp) resumes in one process
    resumed = _losses(_run(tmp, "unsharded", pp=1, resume=_ckpt(tmp, "sharded", 2), steps=4))
    assert resumed == pytest.approx(single[2:], rel=1e-5, abs=0)
    # and one process's checkpoint is sliced again into pp=2 x tp=2 shards
    resharded = _losses(_run(tmp, "resharded", pp=2, tp=2, resume=_ckpt(tmp, "single", 2), steps=4))
    assert resharded == pytest.approx(single[2:], rel=1e-5, abs=0)


def test_resume_chains_across_3d_layouts(tp_runs: tuple[Path, list[float]]) -> None:
    tmp, single = tp_runs
    # pp=2 x tp=2's step-2 checkpoint resumed as tp=4 (every matrix cut 4 ways)
    wide = _losses(_run(tmp, "tp4", pp=1, tp=4, steps=4, checkpoint_every=1,
                        resume=_ckpt(tmp, "sharded", 2)))
    assert wide == pytest.approx(single[2:], rel=1e-5, abs=0)
    # and its step-3 checkpoint as dp=2 x pp=2, AdamW state in ZeRO-1 chunks
    last = _losses(_run(tmp, "dp2pp2", pp=2, dp=2, zero=1, steps=4, resume=_ckpt(tmp, "tp4", 3)))
    assert last == pytest.approx(single[3:], rel=1e-5, abs=0)


def test_zero1_trains_like_one_process_and_resumes_under_any_dp(
    tp_runs: tuple[Path, list[float]],
) -> None:
    tmp, single = tp_runs
    # dp=2 with ZeRO-1: each replica keeps AdamW state for half of every parameter
    zero = _losses(_run(tmp, "zero", pp=1, dp=2, zero=1, steps=4, checkpoint_every=2))
    assert zero == pytest.approx(single, rel=1e-5, abs=0)
    # its checkpoint holds the logical AdamW state (gathered over dp): one process resumes it
    resumed = _losses(_run(tmp, "unzeroed", pp=1, resume=_ckpt(tmp, "zero", 2), steps=4))
    assert resumed == pytest.approx(single[2:], rel=1e-5, abs=0)
    # and one process's checkpoint is cut into ZeRO-1 chunks again
    rezeroed = _losses(_run(tmp, "rezeroed", pp=1, dp=2, zero=1, resume=_ckpt(tmp, "single", 2),
                            steps=4))
    assert rezeroed == pytest.approx(single[2:], rel=1e-5, abs=0)
