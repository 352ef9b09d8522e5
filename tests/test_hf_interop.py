"""Hugging Face interop, checked against ``transformers`` itself: import, export, tokenizers,
and training from an imported model (``conveyor train --init``) under another layout.

Tiny random models are built and saved locally (nothing is downloaded). Tolerances:
logits of Conveyor's single-process Transformer and of transformers agree to 1e-4
(fp32); weights that go through import and export come back bit-identical; training
losses of a pipeline agree with one process to 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conveyor.cli import main
from conveyor.config import ConfigError, DataConfig, ModelConfig
from conveyor.data import Sampler, get_batch
from conveyor.data.tokenizer import load_tokenizer
from conveyor.generation import generate
from conveyor.models import Transformer
from conveyor.models.hf import check_exportable
from conveyor.models.hf_gpt2 import GPT2
from conveyor.models.hf_llama import LLAMA
from conveyor.train.checkpoint import save_checkpoint
from conveyor.train.corpus import prepare
from conveyor.train.export import load_exported, read_exported_config
from conveyor.train.metrics import read_metrics, train_rows

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TEXT = ("def stage(rank, microbatch):\n    return send(activations, rank + 1)  # forward\n"
        "gradients flow back through the pipeline while every microbatch waits its turn. ")
SAMPLE = "def stage(rank):\n    gradients flow back, while microbatch 7 waits."


def _bpe(specials: list[str], vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE tokenizer trained on TEXT (what `conveyor train` builds)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return tok


def _hf_gpt2(path: Path) -> Any:
    tok = transformers.GPT2TokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]),
                                         bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=4, initializer_range=0.2, bos_token_id=eos,
                                  eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _hf_llama(path: Path, hidden_act: str = "silu", **save: Any) -> Any:
    """Llama with GQA (2 kv heads for 4), a vocabulary padded past the tokenizer's, "</s>" as eos."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(["<s>", "</s>"]),
                                               bos_token="<s>", eos_token="</s>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size + 6, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_act=hidden_act)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, **save)
    tok.save_pretrained(path)
    return model


BUILDERS = {"gpt2": _hf_gpt2, "llama": _hf_llama}
TOKENS = torch.tensor([[5, 77, 130, 9, 250, 31, 2, 64, 100, 17, 3, 200]])


def _hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _conveyor_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def _hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None  # compare n tokens, even past an eos
    model.generation_config.pad_token_id = 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def _same_tensors(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_import_matches_transformers_and_exports_back(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "conveyor", tmp_path / "back"
    hf_model = BUILDERS[family](hf_dir)
    assert main(["import", str(hf_dir), "--out", str(ours)]) == 0
    assert "imported" in capsys.readouterr().out

    # the import is a Conveyor export: every reader of one works on it
    model, cfg = load_exported(ours)
    assert cfg.flavour == family and cfg.vocab_size == hf_model.config.vocab_size
    torch.testing.assert_close(_conveyor_logits(model.eval(), TOKENS),
                               _hf_logits(hf_model, TOKENS), rtol=0, atol=1e-4)
    prompt = TOKENS[0, :5].tolist()
    assert generate(model, prompt, 10, temperature=0, stop_at_eot=False) == \
        _hf_greedy(hf_model, prompt, 10)
    ours_tok = load_tokenizer(ours / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours_tok.encode(SAMPLE) == hf_tok.encode(SAMPLE, add_special_tokens=False)
    assert ours_tok.eot_id == hf_model.config.eos_token_id  # "</s>" for llama
    assert main(["generate", "--checkpoint", str(ours), "--prompt", "def stage",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def stage")

    # and back: the very tensors transformers saved, loading with nothing missing
    assert main(["export", "--checkpoint", str(ours), "--out", str(back), "--format", "hf"]) == 0
    _same_tensors(hf_dir, back)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(again) is type(hf_model)
    original = hf_model.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    back_tok = transformers.AutoTokenizer.from_pretrained(back)
    assert back_tok.encode(SAMPLE, add_special_tokens=False) == ours_tok.encode(SAMPLE)


def test_a_geglu_llama_imports_and_exports_with_its_activation(tmp_path: Path) -> None:
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "conveyor", tmp_path / "back"
    hf_model = _hf_llama(hf_dir, hidden_act="gelu_pytorch_tanh")
    assert main(["import", str(hf_dir), "--out", str(ours)]) == 0
    model, cfg = load_exported(ours)
    assert cfg.activation == "gelu_tanh"
    torch.testing.assert_close(_conveyor_logits(model.eval(), TOKENS),
                               _hf_logits(hf_model, TOKENS), rtol=0, atol=1e-4)
    assert main(["export", "--checkpoint", str(ours), "--out", str(back), "--format", "hf"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert again.config.hidden_act == "gelu_pytorch_tanh"
    _same_tensors(hf_dir, back)
    # an ordinary (silu) Llama's config stays the default: activation None
    assert read_exported_config(_import(tmp_path / "silu", _hf_llama)).activation is None


def _import(path: Path, build: Any) -> Path:
    build(path / "hf")
    assert main(["import", str(path / "hf"), "--out", str(path / "ours")]) == 0
    return path / "ours"


def _conveyor_run(tmp_path: Path, cfg: ModelConfig,
                  tokenizer_vocab: int | None = None) -> tuple[Path, Transformer]:
    """A checkpoint of a Conveyor model with a tokenizer trained the way `conveyor train` does
    (of ``tokenizer_vocab`` ids, leaving the rest to the family's special ids)."""
    tok = _bpe(["<|endoftext|>"], vocab_size=tokenizer_vocab or cfg.vocab_size)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = Transformer(cfg, seed=0).eval()
    meta = {"model": dataclasses.asdict(cfg), "tokenizer_path": str(tmp_path / "tokenizer.json")}
    save_checkpoint(tmp_path / "run", 3, tensors=model.state_dict(), meta=meta)
    return tmp_path / "run", model


@pytest.mark.parametrize("cfg", [
    ModelConfig(flavour="gpt2", vocab_size=320, n_layers=2, d_model=32, n_heads=4, max_seq_len=32,
                init_std=0.2),
    ModelConfig(flavour="llama", vocab_size=320, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                max_seq_len=32, tie_embeddings=True, rope_theta=500.0, init_std=0.2),
], ids=["gpt2-untied", "llama-gqa-tied"])
def test_conveyor_model_exports_to_transformers(cfg: ModelConfig, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run, model = _conveyor_run(tmp_path, cfg)
    for out, shard in (("whole", "5GB"), ("sharded", "20KB")):
        assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / out),
                     "--format", "hf", "--max-shard-size", shard]) == 0
        assert "exported step 3" in capsys.readouterr().out
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out,
                                                                     output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        torch.testing.assert_close(_hf_logits(hf.eval(), TOKENS), _conveyor_logits(model, TOKENS),
                                   rtol=0, atol=1e-4)
    index = json.loads((tmp_path / "sharded/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded/model.safetensors").exists()
    _same_tensors(tmp_path / "whole", tmp_path / "sharded")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "whole")
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert hf_tok.eos_token_id == ours.eot_id == hf.config.eos_token_id

    # exported again into the same directory, unsharded: no stale shard is left to mix in
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "sharded"),
                 "--format", "hf"]) == 0
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_sharded_transformers_directory_imports(tmp_path: Path) -> None:
    hf_model = _hf_llama(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    (tmp_path / "hf/tokenizer_config.json").unlink()  # then config.json's eos_token_id names it
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    model, _ = load_exported(tmp_path / "ours")
    torch.testing.assert_close(_conveyor_logits(model, TOKENS), _hf_logits(hf_model, TOKENS),
                               rtol=0, atol=1e-4)
    assert load_tokenizer(tmp_path / "ours/tokenizer.json").eot == "</s>"
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back"),
                 "--format", "hf"]) == 0
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back_tok.eos_token == "</s>" and back_tok.eos_token_id == hf_model.config.eos_token_id
    _same_tensors(tmp_path / "hf", tmp_path / "back")  # shards differ, tensors do not


def _edit_config(hf_dir: Path, **changes: Any) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("family, changes, needle", [
    ("gpt2", {"activation_function": "gelu"}, "activation_function='gelu' is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ("llama", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope_type='llama3'"),
    ("llama", {"architectures": ["MistralForCausalLM"]}, "imports GPT2LMHeadModel, LlamaForCausalLM"),
])
def test_unsupported_settings_are_refused_in_one_line(
    family: str, changes: dict[str, Any], needle: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    BUILDERS[family](tmp_path / "hf")
    assert_import_refused(tmp_path / "hf", changes, needle, capsys)


def assert_import_refused(hf_dir: Path, changes: dict[str, Any], needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """With ``changes`` made to its config.json, importing ``hf_dir`` fails in one line."""
    _edit_config(hf_dir, **changes)
    capsys.readouterr()
    out = hf_dir.parent / "out"
    assert main(["import", str(hf_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conveyor import: error: "), err
    assert needle in err, err
    assert not out.exists()


def test_file_problems_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _hf_gpt2(tmp_path / "hf")
    weights = load_file(tmp_path / "hf/model.safetensors")
    weights.pop("transformer.h.1.mlp.c_fc.bias")
    save_file(weights, tmp_path / "hf/model.safetensors")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "missing transformer.h.1.mlp.c_fc.bias" in capsys.readouterr().err
    # an HF directory given where a Conveyor model is expected says how to convert it
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "x"]) == 2
    assert "conveyor import HF_DIR" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "o"),
                 "--format", "hf", "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 2
    assert "is the model being converted" in capsys.readouterr().err


def test_config_maps_accept_both_rope_spellings_and_base_model_names() -> None:
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}
    assert LLAMA.config_from_hf({**base, "rope_theta": 5e5}, "c").rope_theta == 5e5  # 4.x
    five = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7e4}}
    assert LLAMA.config_from_hf(five, "c").rope_theta == 7e4  # 5.x
    # GPT2Model files (the hub's "gpt2") lack the "transformer." prefix and keep mask buffers
    cfg = GPT2.config_from_hf({"n_embd": 32, "n_head": 4, "n_layer": 1}, "c")
    assert GPT2.canonical("h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert GPT2.is_ignored(GPT2.canonical("h.0.attn.bias"), cfg)
    assert not GPT2.is_ignored("transformer.h.0.attn.c_attn.bias", cfg)


def test_an_option_without_hf_field_is_refused_on_export() -> None:
    narrow = dataclasses.replace(GPT2, exported_fields=GPT2.exported_fields - {"norm_eps"})
    check_exportable(ModelConfig(), narrow)  # the default value needs no field
    with pytest.raises(ConfigError, match="norm_eps=1e-06 has no equivalent in Hugging Face's"):
        check_exportable(ModelConfig(norm_eps=1e-6), narrow)


def _train(runs: Path, name: str, init: Path, corpus: Path, *flags: str) -> list[float]:
    """Train 3 steps from ``init`` with ``flags``; the step losses from metrics.jsonl."""
    assert main(["train", "--init", str(init), "--data", str(corpus), "--batch-size", "4",
                 "--microbatches", "2", "--steps", "3", "--lr", "1e-2", "--warmup", "1",
                 "--eval-every", "0", "--checkpoint-every", "0", "--run-dir", str(runs),
                 "--name", name, *flags]) == 0
    return [r["loss"] for r in train_rows(read_metrics(runs / name / "metrics.jsonl"))]


@pytest.mark.multiprocess
def test_train_init_at_pp2_continues_the_imported_model_like_one_process(tmp_path: Path) -> None:
    _hf_gpt2(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text((TEXT + SAMPLE + "\n") * (10 + i))
    runs = tmp_path / "runs"
    # straight from the Hugging Face directory, 2 stages; and its import, in one process
    pp2 = _train(runs, "pp2", tmp_path / "hf", corpus, "--pp", "2")
    single = _train(runs, "single", tmp_path / "imported", corpus, "--pp", "1")
    assert pp2 == pytest.approx(single, rel=1e-5, abs=0)
    # the first step's loss is the imported model's own on the first batch: its weights
    # and its tokenizer, not fresh ones
    model, cfg = load_exported(tmp_path / "imported")
    tokenizer = load_tokenizer(tmp_path / "imported/tokenizer.json")
    rows = prepare(cfg, DataConfig(paths=(str(corpus),)), seed=0, batch_size=4,
                   run_dir=str(runs), tokenizer=tokenizer).train
    x, y = get_batch(rows, next(Sampler(len(rows), 4, 0)))
    with torch.no_grad():
        assert model.loss(x, y).item() == pytest.approx(pp2[0], rel=1e-5)
    assert load_tokenizer(runs / "pp2/tokenizer.json").to_str() == tokenizer.to_str()
    # resumed, the run keeps the model's tokenizer (a new one would not match its ids)
    assert main(["train", "--resume", str(runs / "pp2"), "--steps", "4", "--run-dir", str(runs),
                 "--name", "more"]) == 0
    assert len(train_rows(read_metrics(runs / "more/metrics.jsonl"))) == 4


@pytest.mark.parametrize("flags, needle", [
    (["--layers", "3"], "n_layers=3 (the model's: 2)"),
    (["--tie-embeddings", "--d-model", "64"], "d_model=64"),
    (["--resume", "somewhere"], "init and resume both given"),
])
def test_train_init_refuses_options_the_model_does_not_have(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_gpt2(tmp_path / "hf")
    capsys.readouterr()
    assert main(["train", "--init", str(tmp_path / "hf"), "--run-dir", str(tmp_path / "runs"),
                 *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conveyor train: error: "), err
    assert needle in err, err
    assert not (tmp_path / "runs").exists()
