"""Hugging Face BERT (``BertForMaskedLM``, ``BertForSequenceClassification``) both ways.

An imported BERT is Conveyor's bert family with the post-norm, erf-GELU, head-bias
options: its MLM logits agree with ``transformers`` to 1e-4 (fp32) as one model and
split into two pipeline stages, export gives back the very tensors, ``from_pretrained``
finds every key, and the WordPiece tokenizer comes back encoding as HF's does, with
its [CLS]/[SEP]/[MASK]/[PAD]. Tiny random models, no download.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from conveyor.cli import main
from conveyor.config import ModelConfig
from conveyor.data.objectives import batch_maker, special_count
from conveyor.data.tokenizer import load_tokenizer
from conveyor.models import SequentialModel
from conveyor.train.checkpoint import save_checkpoint
from conveyor.train.export import load_exported, read_exported_config
from test_hf_families import (
    _conveyor_logits,
    _two_stage_logits,
    assert_init_at_pp2_matches_one_process,
    small_corpus,
)
from test_hf_interop import (
    SAMPLE,
    TEXT,
    _conveyor_run,
    _same_tensors,
    assert_import_refused,
)

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENS = torch.tensor([[2, 77, 130, 9, 150, 31, 4, 64, 100, 17, 3, 120],
                       [2, 11, 42, 160, 7, 3, 55, 3, 0, 0, 0, 0]])
SEGMENTS = torch.tensor([[0] * 6 + [1] * 6, [0] * 6 + [1] * 6])
MASK = (torch.arange(12) < torch.tensor([[12], [8]])).long()  # the second row is padded


def _wordpiece() -> Tokenizer:
    """A lower-casing WordPiece tokenizer trained on TEXT, [CLS] a [SEP] (b [SEP]) around input."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS,
                                        show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _hf_bert(path: Path, cls: str = "BertForMaskedLM", **config: Any) -> Any:
    """A BERT with every weight random (LayerNorms and biases too) and its tokenizer."""
    tok = transformers.BertTokenizerFast(tokenizer_object=_wordpiece(), unk_token="[UNK]",
                                         pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]", mask_token="[MASK]")
    cfg = transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
        pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: a swap would go unseen
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _batch() -> dict[str, torch.Tensor]:
    return {"tokens": TOKENS, "segments": SEGMENTS, "attention_mask": MASK}


def _hf_out(model: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=TOKENS, token_type_ids=SEGMENTS, attention_mask=MASK)


def test_bert_imports_with_transformers_logits_and_exports_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "conveyor", tmp_path / "back"
    hf_model = _hf_bert(hf_dir)
    assert main(["import", str(hf_dir), "--out", str(ours)]) == 0
    assert "imported BertForMaskedLM" in capsys.readouterr().out
    cfg = read_exported_config(ours)
    assert (cfg.family, cfg.norm_position, cfg.activation, cfg.head_bias) == (
        "bert", "post", "gelu", True)
    expected = _hf_out(hf_model).logits
    torch.testing.assert_close(_conveyor_logits(ours, _batch())["logits"], expected,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(_two_stage_logits(ours, _batch())["logits"], expected,
                               rtol=0, atol=1e-4)

    assert main(["export", "--checkpoint", str(ours), "--out", str(back), "--format", "hf"]) == 0
    again, info = transformers.AutoModelForMaskedLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(again) is type(hf_model)
    torch.testing.assert_close(_hf_out(again.eval()).logits, expected, rtol=0, atol=0)
    # the decoder's bias comes along too (transformers 5 unties it from the weights)
    weights = load_file(back / "model.safetensors")
    assert torch.equal(weights.pop("cls.predictions.decoder.bias"), weights["cls.predictions.bias"])
    save_file(weights, back / "model.safetensors")
    _same_tensors(hf_dir, back)  # and every other tensor is the one transformers saved

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    back_tok = transformers.AutoTokenizer.from_pretrained(back)
    ids = hf_tok(SAMPLE, "gradients flow")["input_ids"]
    assert back_tok(SAMPLE, "gradients flow")["input_ids"] == ids
    assert ids[0] == hf_tok.cls_token_id and ids.count(hf_tok.sep_token_id) == 2
    for name in ("cls", "sep", "mask", "pad", "unk"):
        assert getattr(back_tok, f"{name}_token_id") == getattr(hf_tok, f"{name}_token_id"), name
    assert again.config.pad_token_id == hf_tok.pad_token_id


def test_masked_lm_batches_of_an_imported_bert_use_its_tokenizers_ids(tmp_path: Path) -> None:
    _hf_bert(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    cfg = read_exported_config(tmp_path / "ours")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = {n: getattr(hf_tok, f"{n}_token_id") for n in ("pad", "cls", "sep", "mask")}
    assert cfg.special_ids == ids and special_count(cfg) == 0
    rows = np.array([hf_tok.encode(SAMPLE * 3, add_special_tokens=False)[:40]] * 8)
    inputs, targets = batch_maker(cfg, seed=0)(rows, np.arange(8), 0)
    tokens = inputs["tokens"]
    assert (tokens[:, 0] == ids["cls"]).all() and (tokens == ids["sep"]).sum(1).ge(2).all()
    assert (tokens == ids["mask"]).any() and (targets["mlm"] != -100).any()
    padded = inputs["attention_mask"] == 0
    assert (tokens[padded] == ids["pad"]).all()
    assert not np.isin(targets["mlm"].numpy(), list(ids.values())).any()  # specials never masked


def test_bert_for_pretraining_imports_its_next_sentence_head(tmp_path: Path) -> None:
    hf_model = _hf_bert(tmp_path / "hf", "BertForPreTraining")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    out, expected = _conveyor_logits(tmp_path / "ours", _batch()), _hf_out(hf_model)
    torch.testing.assert_close(out["logits"], expected.prediction_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["nsp_logits"], expected.seq_relationship_logits,
                               rtol=0, atol=1e-4)


POST = ModelConfig(family="bert", vocab_size=320, n_layers=2, d_model=32, n_heads=2,
                   max_seq_len=32, norm_position="post", activation="gelu", head_bias=True,
                   init_std=0.2)


@pytest.mark.parametrize("cfg", [POST, dataclasses.replace(POST, tie_embeddings=True,
                                                           activation="gelu_tanh")],
                         ids=["untied-gelu", "tied-gelu_tanh"])
def test_conveyor_bert_exports_to_transformers(cfg: ModelConfig, tmp_path: Path) -> None:
    run, model = _conveyor_run(tmp_path, cfg)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 0
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    single = SequentialModel(cfg, seed=0).eval()
    single.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = single(_batch())["logits"]
    torch.testing.assert_close(_hf_out(hf.eval()).logits, ours, rtol=0, atol=1e-4)


def test_a_conveyor_berts_tokenizer_exports_with_its_special_tokens(tmp_path: Path) -> None:
    base = POST.vocab_size - 4  # conveyor train's tokenizer leaves four ids to pad, cls, sep, mask
    run, _ = _conveyor_run(tmp_path, POST, tokenizer_vocab=base)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = [hf_tok.pad_token_id, hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id]
    assert ids == [base, base + 1, base + 2, base + 3]  # where Conveyor's masked LM put them
    ours = load_tokenizer(tmp_path / "tokenizer.json").encode(SAMPLE)
    assert hf_tok(SAMPLE)["input_ids"] == [base + 1, *ours, base + 2]
    assert hf_tok.decode(hf_tok(SAMPLE)["input_ids"], skip_special_tokens=True) == SAMPLE
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert hf.config.pad_token_id == base


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast' is not supported"),
    ({"type_vocab_size": 3}, "type_vocab_size=3 is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"architectures": ["BertModel"]}, "architectures=['BertModel'] cannot be imported"),
])
def test_bert_settings_without_an_equivalent_are_refused_in_one_line(
    changes: dict[str, Any], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_bert(tmp_path / "hf")
    assert_import_refused(tmp_path / "hf", changes, needle, capsys)


def test_pre_norm_bert_is_refused_on_export_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _conveyor_run(tmp_path, dataclasses.replace(POST, norm_position="pre"))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "o"),
                 "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "norm_position='pre' has no equivalent" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.multiprocess
def test_train_init_of_a_bert_directory_at_pp2_matches_one_process(tmp_path: Path) -> None:
    _hf_bert(tmp_path / "hf")
    assert_init_at_pp2_matches_one_process(tmp_path, "train", "--data", str(small_corpus(tmp_path)),
                                           "--val-fraction", "0")


@pytest.mark.multiprocess
def test_finetune_init_of_a_bert_directory_at_pp2_matches_one_process(tmp_path: Path) -> None:
    _hf_bert(tmp_path / "hf")
    words = ["alpha", "beta", "gamma"]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": SAMPLE[:20 + i], "label": words[i % 3]}) + "\n"
                            for i in range(24)))
    assert_init_at_pp2_matches_one_process(tmp_path, "finetune", "--task", str(task),
                                           "--val-fraction", "0.25")


def test_sequence_classifier_converts_both_ways_with_its_labels(tmp_path: Path) -> None:
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    hf_model = _hf_bert(tmp_path / "hf", "BertForSequenceClassification", id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    cfg = read_exported_config(tmp_path / "ours")
    assert cfg.num_labels == 3 and cfg.norm_position == "post"
    expected = _hf_out(hf_model).logits
    torch.testing.assert_close(_conveyor_logits(tmp_path / "ours", _batch()), expected,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(_two_stage_logits(tmp_path / "ours", _batch()), expected,
                               rtol=0, atol=1e-4)

    # the import keeps the names (labels.json); a fine-tuned checkpoint has them in its meta
    single, _ = load_exported(tmp_path / "ours")
    meta = {"model": dataclasses.asdict(cfg), "task": {"labels": list(labels.values())}}
    save_checkpoint(tmp_path / "run", 5, tensors=single.state_dict(), meta=meta)
    for source, out in ((tmp_path / "ours", "back"), (tmp_path / "run", "named")):
        assert main(["export", "--checkpoint", str(source), "--out", str(tmp_path / out),
                     "--format", "hf"]) == 0
        again, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert type(again) is type(hf_model)
        torch.testing.assert_close(_hf_out(again.eval()).logits, expected, rtol=0, atol=0)
        assert again.config.id2label == labels
    _same_tensors(tmp_path / "hf", tmp_path / "back")
