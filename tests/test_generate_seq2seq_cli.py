"""`conveyor generate` with a t5 model: sources -> outputs, streamed or as JSON lines; bert refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch

from conveyor.cli import main
from conveyor.config import ModelConfig, to_dict
from conveyor.data.corpus import Corpus
from conveyor.data.objectives import special_count
from conveyor.data.tokenizer import Tokenizer, train_tokenizer
from conveyor.generation.batch import Sampling
from conveyor.generation.seq2seq import generate_seq2seq, t5_specials
from conveyor.models import SequentialModel
from test_generate import assert_pp2_file_matches_one_process

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "def generate(model, source):\n    return model(source)\n" * 3,
         "Pipelines pass activations from stage to stage, café à la crème. " * 3]
SOURCES = ["The quick brown", "def generate(model", "café à la crème"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(Corpus(documents=TEXTS, fingerprint="test-seq2seq-cli"), 300,
                           tmp_path_factory.mktemp("tok"))


def _cfg(tokenizer: Tokenizer, family: str = "t5") -> ModelConfig:
    base = ModelConfig(family=family, flavour="llama" if family == "t5" else "gpt2",
                       vocab_size=300, n_layers=2, d_model=32, n_heads=4, max_seq_len=24,
                       init_std=0.5, tie_embeddings=True)
    return replace(base, vocab_size=tokenizer.vocab_size + special_count(base))


def _export(tmp_path: Path, tokenizer: Tokenizer, cfg: ModelConfig) -> Path:
    """A tiny exported model as `conveyor export` writes it."""
    out = tmp_path / f"export-{cfg.family}"
    out.mkdir()
    model = SequentialModel(cfg, seed=2)
    safetensors.torch.save_file({n: p.detach().clone() for n, p in model.named_parameters()},
                                out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    tokenizer.save(out / "tokenizer.json")
    return out


def _expected(cfg: ModelConfig, tokenizer: Tokenizer, n: int) -> list[list[int]]:
    model = SequentialModel(cfg, seed=2).eval()
    eos = t5_specials(cfg).eos
    ids = [tokenizer.encode(s) + [eos] for s in SOURCES]
    return generate_seq2seq(model.blocks, cfg, ids, n, Sampling(temperature=0))


def _text(tokenizer: Tokenizer, cfg: ModelConfig, ids: list[int]) -> str:
    kept = [t for t in ids if t < t5_specials(cfg).pad]
    return str(tokenizer.hf.decode(kept, skip_special_tokens=True))


def test_cli_streams_one_output_and_writes_a_file_of_sources(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tokenizer)
    out = _export(tmp_path, tokenizer, cfg)
    expected = _expected(cfg, tokenizer, 6)
    common = ["generate", "--checkpoint", str(out), "--temperature", "0", "--max-new-tokens", "6"]
    assert main([*common, "--prompt", SOURCES[0]]) == 0
    assert capsys.readouterr().out == _text(tokenizer, cfg, expected[0]) + "\n"
    jsonl = tmp_path / "sources.jsonl"
    jsonl.write_text("".join(json.dumps({"source": s}) + "\n" for s in SOURCES))
    assert main([*common, "--prompts-file", str(jsonl), "--batch-size", "2",
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert records == [{"index": i, "source": s, "output": _text(tokenizer, cfg, e),
                        "new_tokens": len(e)}
                       for i, (s, e) in enumerate(zip(SOURCES, expected, strict=True))]
    assert any(r["output"] for r in records)


@pytest.mark.multiprocess
def test_cli_pipelined_file_matches_one_process(tmp_path: Path, tokenizer: Tokenizer) -> None:
    out = _export(tmp_path, tokenizer, _cfg(tokenizer))
    names = assert_pp2_file_matches_one_process(tmp_path, out, SOURCES)
    assert {"F0 s0", "F0 s1", "F0 s2"} <= names  # round 0 (the encoder) on both, round 1


def test_cli_refuses_bert_and_a_long_source_in_one_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _export(tmp_path, tokenizer, _cfg(tokenizer, "bert"))
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "conveyor predict" in err and len(err.splitlines()) == 1
    t5 = _export(tmp_path, tokenizer, _cfg(tokenizer))
    assert main(["generate", "--checkpoint", str(t5), "--prompt", "The quick brown fox " * 20]) == 2
    err = capsys.readouterr().err.strip()
    assert "at most 23 tokens" in err and len(err.splitlines()) == 1
