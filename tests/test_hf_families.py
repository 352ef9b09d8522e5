"""Hugging Face interop of the encoder and encoder-decoder families, against ``transformers``.

T5 (``T5ForConditionalGeneration`` with gated-silu MLP and unscaled tied head) converts
both ways: logits agree to 1e-4 fp32, weights come back bit-identical, and the model
also runs split into two pipeline stages. What has no exact Conveyor equivalent (the
original T5's relu MLP and rescaled head, per-layer relative-bias tables that differ) is
refused in one line. BERT is ``test_hf_bert``'s. Tiny models, no download.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conveyor.cli import main
from conveyor.config import ModelConfig, ParallelConfig
from conveyor.data.objectives import t5_specials
from conveyor.data.tokenizer import load_tokenizer
from conveyor.models import SequentialModel, build_blocks
from conveyor.parallel.layout import resolve_layout
from conveyor.train.checkpoint import save_checkpoint
from conveyor.train.export import load_exported, read_exported_config
from conveyor.train.metrics import read_metrics, train_rows
from test_hf_interop import (
    SAMPLE,
    TEXT,
    _bpe,
    _conveyor_run,
    _same_tensors,
    assert_import_refused,
)

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 77, 130, 9, 250, 31, 2, 64, 100, 17, 3, 200],
                       [8, 1, 42, 260, 7, 19, 55, 0, 0, 0, 0, 0]])
MASK = (torch.arange(12) < torch.tensor([[12], [7]])).long()  # the second row is padded
DECODER = torch.tensor([[0, 12, 99, 4, 180, 6], [0, 3, 3, 71, 20, 9]])


def _hf_t5(path: Path, feed_forward_proj: str = "gated-silu", **config: Any) -> Any:
    """A T5 of the supported kind (gated-silu, unscaled head) with a BPE tokenizer, "</s>" as
    eos, and four sentinels at the top as HF's T5 tokenizer places them (<extra_id_0> last)."""
    bpe = _bpe(["<pad>", "</s>"])
    bpe.add_special_tokens([f"<extra_id_{k}>" for k in reversed(range(4))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>",
                                               eos_token="</s>")
    cfg = transformers.T5Config(
        vocab_size=tok.vocab_size + 4, d_model=32, d_kv=16, num_heads=2, d_ff=48, num_layers=2,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=False,
        n_positions=32,  # what Conveyor reads as max_seq_len (T5 itself has no limit)
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0,
        **{"initializer_factor": 4.0, **config})
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _batch() -> dict[str, torch.Tensor]:
    return {"tokens": TOKENS, "attention_mask": MASK, "decoder_tokens": DECODER,
            "decoder_mask": torch.ones_like(DECODER)}


def _hf_logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, attention_mask=MASK, decoder_input_ids=DECODER).logits


def _conveyor_logits(path: Path, batch: dict[str, torch.Tensor] | None = None) -> Any:
    """Output of the export at ``path`` on ``batch`` (T5's by default), run as one model."""
    single, cfg = load_exported(path)
    model = SequentialModel(cfg, seed=0).eval()
    model.load_state_dict(single.state_dict())
    with torch.no_grad():
        return model(_batch() if batch is None else batch)


def _two_stage_logits(path: Path, batch: dict[str, torch.Tensor] | None = None) -> Any:
    """Output of the export at ``path`` split as a 2-stage pipeline places it, stage by stage."""
    single, cfg = load_exported(path)
    tensors = single.state_dict()
    layout = resolve_layout(cfg, ParallelConfig(pp=2, microbatches=2), batch_size=2)
    state: Any = _batch() if batch is None else batch
    for start, end in layout.partition.bounds:
        assert (start, end) != (0, cfg.num_blocks)  # really split
        for i, block in zip(range(start, end), build_blocks(cfg, 1, range(start, end)),
                            strict=True):
            for name, param in block.named_parameters():
                # the tied head away from the embedding holds its own copy of the table
                key = "blocks.0.tok.weight" if (i, name) == (cfg.num_blocks - 1, "proj.weight") \
                    else f"blocks.{i}.{name}"
                param.data.copy_(tensors[key])
            with torch.no_grad():
                state = block.eval()(state)
    return state


@pytest.mark.parametrize("gate", ["gated-silu", "gated-gelu"])
def test_t5_imports_with_transformers_logits_and_exports_back(
    gate: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "conveyor", tmp_path / "back"
    # HF's gelu_new and torch's tanh GELU round apart: smaller weights keep the logits small
    hf_model = _hf_t5(hf_dir, gate, initializer_factor=4.0 if gate == "gated-silu" else 1.0)
    assert main(["import", str(hf_dir), "--out", str(ours)]) == 0
    assert "imported T5ForConditionalGeneration" in capsys.readouterr().out
    expected = _hf_logits(hf_model)
    torch.testing.assert_close(_conveyor_logits(ours), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(_two_stage_logits(ours), expected, rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours_tok = load_tokenizer(ours / "tokenizer.json")
    assert ours_tok.encode(SAMPLE) == hf_tok.encode(SAMPLE, add_special_tokens=False)
    # span corruption uses the model's own ids: pad (the decoder start) 0, eos 1, sentinels on top
    specials = t5_specials(read_exported_config(ours))
    top = hf_tok.convert_tokens_to_ids("<extra_id_0>")
    assert (specials.pad, specials.eos, specials.sentinels) == (0, 1, 4)
    assert [specials.sentinel(k) for k in range(4)] == [top, top - 1, top - 2, top - 3]

    assert main(["export", "--checkpoint", str(ours), "--out", str(back), "--format", "hf"]) == 0
    again, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(again) is type(hf_model) and not again.config.scale_decoder_outputs
    assert again.config.feed_forward_proj == gate  # T5 v1.1's GeGLU: activation="gelu_tanh"
    torch.testing.assert_close(_hf_logits(again.eval()), expected, rtol=0, atol=0)
    back_tok = transformers.AutoTokenizer.from_pretrained(back)
    assert back_tok.encode(SAMPLE, add_special_tokens=False) == ours_tok.encode(SAMPLE)
    # transformers 4.x reads the exported config as untied: lm_head comes along, shared's copy
    weights = load_file(back / "model.safetensors")
    assert torch.equal(weights.pop("lm_head.weight"), weights["shared.weight"])
    save_file(weights, back / "model.safetensors")
    _same_tensors(hf_dir, back)  # and every other tensor is the one transformers saved


def small_corpus(tmp_path: Path) -> Path:
    """A directory of four small text files (enough rows for batch 4 at seq 32)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text((TEXT + SAMPLE + "\n") * (6 + i))
    return corpus


def assert_init_at_pp2_matches_one_process(tmp_path: Path, command: str, *data: str) -> None:
    """``conveyor COMMAND --init tmp_path/hf DATA...`` at pp 2 logs the losses it logs at pp 1."""
    losses = {}
    for pp in ("1", "2"):
        assert main([command, "--init", str(tmp_path / "hf"), *data,
                     "--batch-size", "4", "--microbatches", "2", "--steps", "2", "--lr", "1e-3",
                     "--warmup", "1", "--eval-every", "0", "--checkpoint-every", "0",
                     "--run-dir", str(tmp_path / "runs"), "--name", f"pp{pp}", "--pp", pp]) == 0
        rows = train_rows(read_metrics(tmp_path / f"runs/pp{pp}/metrics.jsonl"))
        losses[pp] = [r["loss"] for r in rows]
    assert len(losses["1"]) == 2 and losses["2"] == pytest.approx(losses["1"], rel=1e-5, abs=0)


@pytest.mark.multiprocess
def test_train_init_of_a_t5_directory_at_pp2_matches_one_process(tmp_path: Path) -> None:
    _hf_t5(tmp_path / "hf")
    assert_init_at_pp2_matches_one_process(tmp_path, "train", "--data", str(small_corpus(tmp_path)),
                                           "--val-fraction", "0")


T5_CFG = ModelConfig(family="t5", flavour="llama", vocab_size=320, n_layers=2, d_model=32,
                     n_heads=2, d_ff=48, max_seq_len=32, tie_embeddings=True, init_std=0.2)


def test_conveyor_t5_exports_when_each_stack_has_one_relative_bias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _conveyor_run(tmp_path, T5_CFG)
    capsys.readouterr()  # the checkpoint's log line
    # trained in Conveyor, each layer's table is its own: HF has one per stack
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "no"),
                 "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "relative_attention_bias.weight" in err, err
    assert "blocks.2.attn.relative.table.weight differs" in err, err

    base = T5_CFG.vocab_size - 18  # conveyor train leaves pad, eos and 16 sentinels after it
    _bpe(["<|endoftext|>"], vocab_size=base).save(str(tmp_path / "t5_tokenizer.json"))
    model = SequentialModel(T5_CFG, seed=0)
    meta = {"model": dataclasses.asdict(T5_CFG), "tokenizer_path": str(tmp_path / "t5_tokenizer.json")}
    tensors = model.state_dict()
    for first in (1, T5_CFG.n_layers + 2):  # the encoder's layers, the decoder's
        for i in range(first + 1, first + T5_CFG.n_layers):
            tensors[f"blocks.{i}.attn.relative.table.weight"] = \
                tensors[f"blocks.{first}.attn.relative.table.weight"].clone()
    model.load_state_dict(tensors)
    save_checkpoint(tmp_path / "shared", 1, tensors=model.state_dict(), meta=meta)
    assert main(["export", "--checkpoint", str(tmp_path / "shared"), "--out",
                 str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ours = model.eval()(_batch())
    torch.testing.assert_close(_hf_logits(hf.eval()), ours, rtol=0, atol=1e-4)
    # the tokenizer names the ids span corruption trained with, as HF's T5 tokenizer does
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (base, base + 1)
    assert hf_tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_15>"]) == [base + 2, base + 17]
    assert hf.config.decoder_start_token_id == hf.config.pad_token_id == base


@pytest.mark.parametrize("changes, needle", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu' is not supported"),
    ({"scale_decoder_outputs": True}, "scale_decoder_outputs=True is not supported"),
    ({"relative_attention_max_distance": 64}, "relative_attention_max_distance=64"),
    ({"num_decoder_layers": 3}, "num_decoder_layers=3 is not supported"),
])
def test_t5_settings_without_an_equivalent_are_refused_in_one_line(
    changes: dict[str, Any], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_t5(tmp_path / "hf")
    assert_import_refused(tmp_path / "hf", changes, needle, capsys)


def test_a_stored_head_that_differs_from_the_tied_table_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_t5(tmp_path / "hf")
    weights = load_file(tmp_path / "hf/model.safetensors")
    weights["lm_head.weight"] = weights["shared.weight"] + 1  # an untied 4.x checkpoint
    save_file(weights, tmp_path / "hf/model.safetensors")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "lm_head.weight differs from shared.weight" in capsys.readouterr().err
    weights["lm_head.weight"] = weights["shared.weight"].clone()  # a tied copy is fine
    save_file(weights, tmp_path / "hf/model.safetensors")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0


def test_untied_t5_is_refused_on_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _conveyor_run(tmp_path, dataclasses.replace(T5_CFG, tie_embeddings=False))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "o"),
                 "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tie_embeddings=False has no equivalent" in err, err
    assert not (tmp_path / "o").exists()


def test_t5_sentinels_default_to_the_unused_top_rows(tmp_path: Path) -> None:
    hf = _hf_t5(tmp_path / "hf")
    plain = _bpe(["<pad>", "</s>"])  # no <extra_id_k>
    plain.save(str(tmp_path / "hf/tokenizer.json"))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    specials = t5_specials(read_exported_config(tmp_path / "ours"))
    top, free = hf.config.vocab_size - 1, hf.config.vocab_size - plain.get_vocab_size()
    assert (specials.pad, specials.eos, specials.sentinels) == (0, 1, free)
    assert [specials.sentinel(k) for k in range(free)] == [top - k for k in range(free)]


def test_imported_t5_generates_what_transformers_generates(tmp_path: Path) -> None:
    from conveyor.generation.batch import Sampling
    from conveyor.generation.seq2seq import generate_seq2seq

    hf_dir, ours = tmp_path / "hf", tmp_path / "conveyor"
    hf_model = _hf_t5(hf_dir)
    assert main(["import", str(hf_dir), "--out", str(ours)]) == 0
    single, cfg = load_exported(ours)
    sources = [TOKENS[0].tolist(), TOKENS[1, :7].tolist()]  # unequal lengths: one batch, padded
    got = generate_seq2seq(single.blocks, cfg, sources, 8,
                           Sampling(temperature=0.0, top_k=None, top_p=None, stop_at_eot=False))
    for source, ids in zip(sources, got, strict=True):
        with torch.no_grad():
            hf = hf_model.generate(torch.tensor([source]), do_sample=False, max_new_tokens=8,
                                   min_new_tokens=8, num_beams=1)
        assert ids == hf[0, 1:].tolist()  # HF's output starts with the decoder start token
