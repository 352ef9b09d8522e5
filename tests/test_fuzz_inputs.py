"""Malformed input to every subcommand: exit status != 0, exactly one error line naming the
problem, no traceback, and nothing written or changed (caches aside).

Each case is ``(id, argv template, needle)``: the template's ``{name}`` fields are paths
of the fixture below (a tiny run with a checkpoint, an export, a corpus, broken
files). Everything runs in this process through ``conveyor.cli.main``; no rank is
spawned (the launcher is replaced by one that fails the test).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import conveyor.train.evaluation  # noqa: F401  (imported before patching: they bind `launch`)
import conveyor.train.trainer  # noqa: F401
from conveyor.cli import main
from conveyor.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from conveyor.data.sampler import Sampler
from conveyor.models import Transformer
from conveyor.models.blocks import HeadBlock
from conveyor.train.checkpoint import save_checkpoint
from conveyor.train.corpus import prepare
from conveyor.train.export import write_export
from conveyor.train.metrics import METRICS_FILE, MetricsWriter
from conveyor.train.rundir import TOKENIZER_FILE, create_run_dir

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2"]
WORDS = ("stage rank sends activations forward while gradients flow back through the "
         "pipeline and every microbatch waits its turn").split()
MODEL = ModelConfig(vocab_size=320, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"doc{i}.txt").write_text("\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
            for _ in range(150)))
    return root


def _tensors(cfg: ModelConfig) -> dict:
    state = {k: v.clone() for k, v in Transformer(cfg, seed=0).state_dict().items()}
    if cfg.tie_embeddings:
        del state[f"blocks.{cfg.num_blocks - 1}.{HeadBlock.tied_param_name}"]
    return state


def _edited_checkpoint(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of checkpoint ``src`` whose meta.json went through ``edit``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    meta = json.loads((dst / "meta.json").read_text())
    edit(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every file the cases name, built in this process."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = _corpus(root / "corpus")
    run = RunConfig(model=MODEL, parallel=ParallelConfig(microbatches=2),
                    train=TrainConfig(steps=4, batch_size=8, warmup=1, run_dir=str(root / "runs"),
                                      name="r"),
                    data=DataConfig(paths=(str(corpus),), val_fraction=0.1))
    data = prepare(MODEL, run.data, seed=0, batch_size=8, run_dir=str(root / "runs"))
    run_dir = create_run_dir(run, data.tokenizer)
    meta = {**run.to_dict(), "sampler": Sampler(len(data.train), 8, 0).state_dict(),
            "tokenizer_path": str(run_dir / TOKENIZER_FILE)}
    ckpt = save_checkpoint(run_dir, 2, tensors=_tensors(MODEL), meta=meta)
    with MetricsWriter(run_dir / METRICS_FILE) as m:
        m.write({"step": 1, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
                 "elapsed_s": 1.0})
    export = root / "export"
    write_export(export, MODEL, _tensors(MODEL), run_dir / TOKENIZER_FILE)

    bad = root / "bad"
    bad.mkdir()
    (bad / "garbage.txt").write_text("}{ not json, not toml, not csv \x00\n")
    (bad / "empty.txt").write_text("")
    (bad / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (bad / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (bad / "small.txt").write_text("tiny corpus.")
    (bad / "unknown.toml").write_text("[model]\nlayers = 4\n")
    (bad / "wrongtype.toml").write_text("[train]\nlr = \"fast\"\n")
    (bad / "section.toml").write_text("model = 3\n")
    (bad / "model_neg.json").write_text('{"n_layers": -1}')
    (bad / "model_unknown.json").write_text('{"layerz": 2}')
    (bad / "model_list.json").write_text('[1, 2]')
    (bad / "sched.csv").write_text("rank,actions\n0,1Q0 zz\n")
    (bad / "metrics_garbage").mkdir()
    (bad / "metrics_garbage" / METRICS_FILE).write_text("garbage\n{\"step\": \n")
    (bad / "metrics_badrow").mkdir()
    (bad / "metrics_badrow" / METRICS_FILE).write_text('{"step": "x", "loss": "y"}\n')
    (bad / "metrics_dir").mkdir()
    (bad / "metrics_dir" / METRICS_FILE).mkdir()
    for name, timeline in [("trace_trunc", '{"ranks": {"0": [['),
                           ("trace_shape", '{"ranks": 7}'), ("trace_noconfig", None)]:
        d = bad / name
        d.mkdir()
        (d / "timeline.json").write_text(timeline or '{"meta": {}, "ranks": {}}')
        if timeline is not None:
            (d / "config.json").write_text((run_dir / "config.json").read_text())
    (bad / "trace_badconfig").mkdir()
    (bad / "trace_badconfig" / "timeline.json").write_text('{"meta": {}, "ranks": {}}')
    (bad / "trace_badconfig" / "config.json").write_text("{not json")
    (bad / "a_file").write_text("I am a file, not a directory")

    ck = bad / "ckpts"
    edits = {
        "d_model": lambda m: m["model"].update(d_model=48),
        "step": lambda m: m.update(step="eight"),
        "nomodel": lambda m: m.pop("model"),
        "badmodel": lambda m: m.update(model={"n_layers": "two"}),
        "notrain": lambda m: m.pop("train"),
        "version": lambda m: m.update(format_version=99),
        "files": lambda m: m.update(files=[]),
        "badpar": lambda m: m["parallel"].update(pp=0),
    }
    for name, edit in edits.items():
        _edited_checkpoint(ckpt, ck / name / "checkpoints" / "step-00000002", edit)
    (ck / "garbage_meta" / "step-00000002").mkdir(parents=True)
    (ck / "garbage_meta" / "step-00000002" / "meta.json").write_text("{oops")
    shard = ck / "shard" / "step-00000002"
    _edited_checkpoint(ckpt, shard, lambda m: None)
    (shard / "shard-0.safetensors").write_bytes(b"\x00" * 64)
    nan = ck / "nan" / "step-00000002"
    _edited_checkpoint(ckpt, nan, lambda m: None)

    other_tok = root / "other_tok"
    other_tok.mkdir()
    other = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    prepare(other, DataConfig(paths=(str(corpus),), cache_dir=str(other_tok)), seed=0,
            batch_size=8, run_dir=str(other_tok))
    other_json = next(p for p in other_tok.rglob("*.json") if "tokenizer" in p.name)
    (bad / "export_badtok").mkdir()
    for f in export.iterdir():
        (bad / "export_badtok" / f.name).write_bytes(f.read_bytes())
    (bad / "export_badtok" / "tokenizer.json").write_text("{broken")
    (bad / "export_badcfg").mkdir()
    for f in export.iterdir():
        (bad / "export_badcfg" / f.name).write_bytes(f.read_bytes())
    (bad / "export_badcfg" / "config.json").write_text('{"n_layers": 0}')
    (bad / "export_nan").mkdir()
    for f in export.iterdir():
        (bad / "export_nan" / f.name).write_bytes(f.read_bytes())
    _nan_weights(bad / "export_nan" / "model.safetensors")
    (bad / "hf_noconfig").mkdir()
    (bad / "hf_garbage").mkdir()
    (bad / "hf_garbage" / "config.json").write_text("{nope")
    (bad / "hf_bert").mkdir()
    (bad / "hf_bert" / "config.json").write_text('{"model_type": "bert", "architectures": '
                                                 '["BertModel"]}')
    (root / "work").mkdir()
    out = {"root": str(root), "corpus": str(corpus), "run": str(run_dir), "ckpt": str(ckpt),
           "export": str(export), "bad": str(bad), "ck": str(ck), "tok": str(other_json),
           "new": str(root / "work" / "new")}
    return out


def _nan_weights(path: Path) -> None:
    import safetensors.torch
    import torch

    tensors = safetensors.torch.load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    safetensors.torch.save_file(tensors, str(path))


T0 = ["train", *TINY, "--run-dir", "{new}"]
T = [*T0, "--data", "{corpus}"]
G = ["generate", "--checkpoint", "{export}", "--prompt", "stage rank"]
GC = ["generate", "--checkpoint", "{run}", "--prompt", "stage rank"]
E = ["eval", "--checkpoint", "{run}"]
X = ["export", "--checkpoint", "{run}"]
S = ["simulate", "--model", "demo", "--out", "{new}.png"]
SH = ["schedule", "show"]

CASES: list[tuple[str, list[str], str]] = [
    # -- train: numbers ---------------------------------------------------------------
    ("train-lr-inf", [*T, "--lr", "inf"], "lr=inf"),
    ("train-lr-nan", [*T, "--lr", "nan"], "lr=nan"),
    ("train-lr-neg", [*T, "--lr", "-1"], "lr=-1"),
    ("train-lr-zero", [*T, "--lr", "0"], "lr=0"),
    ("train-lr-text", [*T, "--lr", "fast"], "--lr"),
    ("train-min-lr-nan", [*T, "--min-lr", "nan"], "min_lr=nan"),
    ("train-min-lr-above", [*T, "--min-lr", "1"], "min_lr=1"),
    ("train-norm-eps-neg", [*T, "--norm-eps", "-1"], "norm_eps=-1"),
    ("train-norm-eps-zero", [*T, "--norm-eps", "0"], "norm_eps=0"),
    ("train-norm-eps-nan", [*T, "--norm-eps", "nan"], "norm_eps=nan"),
    ("train-rope-zero", [*T, "--flavour", "llama", "--rope-theta", "0"], "rope_theta=0"),
    ("train-rope-neg", [*T, "--flavour", "llama", "--rope-theta", "-5"], "rope_theta=-5"),
    ("train-rope-inf", [*T, "--flavour", "llama", "--rope-theta", "inf"], "rope_theta=inf"),
    ("train-init-std-neg", [*T, "--init-std", "-0.02"], "init_std=-0.02"),
    ("train-init-std-nan", [*T, "--init-std", "nan"], "init_std=nan"),
    ("train-init-std-inf", [*T, "--init-std", "inf"], "init_std=inf"),
    ("train-wd-neg", [*T, "--weight-decay", "-1"], "weight_decay=-1"),
    ("train-wd-inf", [*T, "--weight-decay", "inf"], "weight_decay=inf"),
    ("train-clip-neg", [*T, "--grad-clip", "-1"], "grad_clip=-1"),
    ("train-clip-nan", [*T, "--grad-clip", "nan"], "grad_clip=nan"),
    ("train-warmup-eq-steps", [*T, "--steps", "5", "--warmup", "5"], "warmup=5"),
    ("train-warmup-gt-steps", [*T, "--steps", "5", "--warmup", "9"], "warmup=9"),
    ("train-warmup-neg", [*T, "--warmup", "-1"], "warmup=-1"),
    ("train-steps-zero", [*T, "--steps", "0"], "steps=0"),
    ("train-steps-neg", [*T, "--steps", "-3"], "steps=-3"),
    ("train-batch-zero", [*T, "--batch-size", "0"], "batch_size=0"),
    ("train-micro-zero", [*T, "--microbatches", "0"], "microbatches=0"),
    ("train-pp-zero", [*T, "--pp", "0"], "pp=0"),
    ("train-dp-neg", [*T, "--dp", "-1"], "dp=-1"),
    ("train-tp-indivisible", [*T, "--tp", "3"], "tp"),
    ("train-layers-zero", [*T, "--layers", "0"], "n_layers=0"),
    ("train-dmodel-zero", [*T, "--d-model", "0"], "d_model=0"),
    ("train-heads-zero", [*T, "--heads", "0"], "n_heads=0"),
    ("train-vocab-zero", [*T, "--vocab-size", "0"], "vocab_size=0"),
    ("train-vocab-tiny", [*T, "--vocab-size", "10"], "vocab_size=10"),
    ("train-seq-zero", [*T, "--seq-len", "0"], "max_seq_len=0"),
    ("train-kv-gpt2", [*T, "--kv-heads", "1"], "n_kv_heads"),
    ("train-dff-zero", [*T, "--d-ff", "0"], "d_ff=0"),
    ("train-eval-every-neg", [*T, "--eval-every", "-1"], "eval_every=-1"),
    ("train-eval-batches-zero", [*T, "--eval-batches", "0"], "eval_batches=0"),
    ("train-ckpt-every-neg", [*T, "--checkpoint-every", "-1"], "checkpoint_every=-1"),
    ("train-keep-neg", [*T, "--keep", "-1"], "keep=-1"),
    ("train-seed-neg", [*T, "--seed", "-1"], "seed=-1"),
    ("train-virtual-zero", [*T, "--virtual-stages", "0"], "virtual_stages=0"),
    ("train-bucket-neg", [*T, "--dp-bucket-mb", "-1"], "dp_bucket_mb=-1"),
    ("train-bucket-nan", [*T, "--dp-bucket-mb", "nan"], "dp_bucket_mb=nan"),
    ("train-zero-2", [*T, "--zero", "2"], "zero=2"),
    ("train-flavour", [*T, "--flavour", "bert"], "flavour='bert'"),
    ("train-schedule", [*T, "--schedule", "nope"], "schedule='nope'"),
    ("train-partition", [*T, "--partition", "x"], "partition='x'"),
    ("train-val-neg", [*T, "--val-fraction", "-0.1"], "val_fraction=-0.1"),
    ("train-val-nan", [*T, "--val-fraction", "nan"], "val_fraction=nan"),
    ("train-val-one", [*T, "--val-fraction", "1"], "val_fraction=1"),
    ("train-name-empty", [*T, "--name", ""], "name=''"),
    ("train-name-dots", [*T, "--name", ".."], "name='..'"),
    ("train-run-dir-empty", [*T, "--run-dir", ""], "run_dir=''"),
    ("train-sp-without-tp", [*T, "--sequence-parallel"], "sequence_parallel"),
    ("train-timeout-zero", [*T, "--timeout", "0"], "timeout"),
    ("train-timeout-nan", [*T, "--timeout", "nan"], "timeout"),
    ("train-unknown-flag", [*T, "--learning-rate", "1"], "--learning-rate"),
    # -- train: files -----------------------------------------------------------------
    ("train-sched-missing", [*T, "--schedule-file", "{bad}/none.csv"], "none.csv"),
    ("train-sched-garbage", [*T, "--schedule-file", "{bad}/sched.csv"], "sched.csv"),
    ("train-config-missing", [*T, "--config", "{bad}/none.toml"], "none.toml"),
    ("train-config-garbage", [*T, "--config", "{bad}/garbage.txt"], "garbage.txt"),
    ("train-config-unknown", [*T, "--config", "{bad}/unknown.toml"], "'layers'"),
    ("train-config-type", [*T, "--config", "{bad}/wrongtype.toml"], "lr='fast'"),
    ("train-config-section", [*T, "--config", "{bad}/section.toml"], "model"),
    ("train-data-missing", [*T0, "--data", "{bad}/none.txt"], "none.txt"),
    ("train-data-empty", [*T0, "--data", "{bad}/empty.txt"], "no usable text"),
    ("train-data-binary", [*T0, "--data", "{bad}/binary.bin"], "no usable text"),
    ("train-data-notext", [*T0, "--data", "{bad}/notext.jsonl"], "text"),
    ("train-data-small", [*T0, "--data", "{bad}/small.txt", "--val-fraction", "0"],
     "too small"),
    ("train-data-one-doc", [*T0, "--data", "{bad}/small.txt"], "at least 2"),
    ("train-run-dir-file", [*T, "--run-dir", "{bad}/a_file"], "a_file"),
    ("train-run-dir-under-file", [*T, "--run-dir", "{bad}/a_file/runs"], "a_file"),
    ("train-cache-file", [*T, "--cache-dir", "{bad}/a_file"], "a_file"),
    ("train-resume-missing", [*T, "--resume", "{bad}/none"], "does not exist"),
    ("train-resume-garbage", [*T, "--resume", "{ck}/garbage_meta/step-00000002"], "corrupt"),
    ("train-resume-dmodel", [*T, "--resume", "{ck}/d_model", "--d-model", "32"], "d_model"),
    ("train-resume-step", [*T, "--resume", "{ck}/step"], "step"),
    ("train-resume-nomodel", [*T, "--resume", "{ck}/nomodel"], "model"),
    ("train-resume-badmodel", [*T, "--resume", "{ck}/badmodel"], "n_layers"),
    ("train-resume-version", [*T, "--resume", "{ck}/version"], "format_version"),
    ("train-resume-done", ["train", "--resume", "{run}", "--run-dir", "{new}", "--steps", "2"],
     "step 2"),
    ("train-resume-auto-file", [*T, "--resume", "auto", "--name", "x", "--run-dir",
                                "{bad}/a_file"], "a_file"),
    # -- eval -------------------------------------------------------------------------
    ("eval-missing", ["eval", "--checkpoint", "{bad}/none"], "does not exist"),
    ("eval-file", ["eval", "--checkpoint", "{bad}/a_file"], "a_file"),
    ("eval-batch-zero", [*E, "--batch-size", "0"], "batch_size=0"),
    ("eval-batch-neg", [*E, "--batch-size", "-2"], "batch_size=-2"),
    ("eval-batches-zero", [*E, "--batches", "0"], "batches=0"),
    ("eval-timeout-zero", [*E, "--timeout", "0"], "timeout=0"),
    ("eval-timeout-nan", [*E, "--timeout", "nan"], "timeout=nan"),
    ("eval-batches-neg", [*E, "--batches", "-1"], "batches=-1"),
    ("eval-pp-zero", [*E, "--pp", "0"], "pp=0"),
    ("eval-micro-zero", [*E, "--microbatches", "0"], "microbatches=0"),
    ("eval-batch-split", [*E, "--batch-size", "3"], "batch_size=3"),
    ("eval-schedule", [*E, "--schedule", "nope"], "schedule='nope'"),
    ("eval-partition", [*E, "--partition", "x"], "partition='x'"),
    ("eval-tp", [*E, "--tp", "3"], "tp"),
    ("eval-dmodel", ["eval", "--checkpoint", "{ck}/d_model"], "d_model"),
    ("eval-step", ["eval", "--checkpoint", "{ck}/step"], "step"),
    ("eval-nomodel", ["eval", "--checkpoint", "{ck}/nomodel"], "model"),
    ("eval-notrain", ["eval", "--checkpoint", "{ck}/notrain"], "train"),
    ("eval-files", ["eval", "--checkpoint", "{ck}/files"], "corrupt"),
    ("eval-badpar", ["eval", "--checkpoint", "{ck}/badpar"], "pp=0"),
    # -- generate ---------------------------------------------------------------------
    ("gen-missing", ["generate", "--checkpoint", "{bad}/none", "--prompt", "x"], "none"),
    ("gen-max-zero", [*G, "--max-new-tokens", "0"], "max_new_tokens=0"),
    ("gen-max-neg", [*G, "--max-new-tokens", "-1"], "max_new_tokens=-1"),
    ("gen-temp-neg", [*G, "--temperature", "-1"], "temperature"),
    ("gen-temp-nan", [*G, "--temperature", "nan"], "temperature"),
    ("gen-topk-neg", [*G, "--top-k", "-1"], "top_k"),
    ("gen-topp-zero", [*G, "--top-p", "0"], "top_p"),
    ("gen-topp-two", [*G, "--top-p", "2"], "top_p"),
    ("gen-pp-zero", [*G, "--pp", "0"], "--pp 0"),
    ("gen-pp-big", [*G, "--pp", "100"], "--pp 100"),
    ("gen-timeout-zero", [*G, "--timeout", "0"], "timeout"),
    ("gen-timeout-neg", [*G, "--timeout", "-5", "--pp", "2"], "timeout"),
    ("gen-tok-missing", [*G, "--tokenizer", "{bad}/none.json"], "none.json"),
    ("gen-tok-garbage", [*G, "--tokenizer", "{bad}/garbage.txt"], "garbage.txt"),
    ("gen-tok-vocab", [*G, "--tokenizer", "{tok}"], "vocab"),
    ("gen-ckpt-tok-vocab", [*GC, "--tokenizer", "{tok}"], "vocab"),
    ("gen-export-badtok", ["generate", "--checkpoint", "{bad}/export_badtok", "--prompt", "x"],
     "tokenizer.json"),
    ("gen-export-badcfg", ["generate", "--checkpoint", "{bad}/export_badcfg", "--prompt", "x"],
     "n_layers=0"),
    ("gen-export-nan", ["generate", "--checkpoint", "{bad}/export_nan", "--prompt", "x"],
     "not finite"),
    ("gen-ckpt-shard", ["generate", "--checkpoint", "{ck}/shard", "--prompt", "x"],
     "shard-0.safetensors"),
    ("gen-ckpt-badmodel", ["generate", "--checkpoint", "{ck}/badmodel", "--prompt", "x"],
     "n_layers"),
    ("gen-prompt-long", [*G, "--prompt", "stage rank " * 40], "max_seq_len"),
    # -- export / import --------------------------------------------------------------
    ("export-missing", ["export", "--checkpoint", "{bad}/none", "--out", "{new}"], "none"),
    ("export-out-file", [*X, "--out", "{bad}/a_file"], "a_file"),
    ("export-out-under-file", [*X, "--out", "{bad}/a_file/out"], "a_file"),
    ("export-size-text", [*X, "--out", "{new}", "--format", "hf", "--max-shard-size", "big"],
     "big"),
    ("export-size-zero", [*X, "--out", "{new}", "--format", "hf", "--max-shard-size", "0"],
     "0"),
    ("export-tok-missing", [*X, "--out", "{new}", "--tokenizer", "{bad}/none.json"],
     "none.json"),
    ("export-tok-garbage", [*X, "--out", "{new}", "--tokenizer", "{bad}/garbage.txt"],
     "garbage.txt"),
    ("export-tok-vocab", [*X, "--out", "{new}", "--tokenizer", "{tok}"], "vocab"),
    ("export-export-badtok", ["export", "--checkpoint", "{bad}/export_badtok", "--out",
                              "{new}"], "tokenizer.json"),
    ("export-shard", ["export", "--checkpoint", "{ck}/shard", "--out", "{new}"],
     "shard-0.safetensors"),
    ("export-format", [*X, "--out", "{new}", "--format", "onnx"], "onnx"),
    ("import-missing", ["import", "{bad}/none", "--out", "{new}"], "none"),
    ("import-noconfig", ["import", "{bad}/hf_noconfig", "--out", "{new}"], "config.json"),
    ("import-garbage", ["import", "{bad}/hf_garbage", "--out", "{new}"], "config.json"),
    ("import-bert", ["import", "{bad}/hf_bert", "--out", "{new}"], "bert"),
    ("import-file", ["import", "{bad}/a_file", "--out", "{new}"], "a_file"),
    # -- simulate ---------------------------------------------------------------------
    ("sim-pp-zero", [*S, "--pp", "0"], "pp=0"),
    ("sim-pp-neg", [*S, "--pp", "-1"], "pp=-1"),
    ("sim-micro-zero", [*S, "--microbatches", "0"], "microbatches=0"),
    ("sim-virtual-zero", [*S, "--virtual", "0"], "virtual"),
    ("sim-virtual-neg", [*S, "--virtual", "-1"], "virtual"),
    ("sim-mbs-zero", [*S, "--microbatch-size", "0"], "microbatch"),
    ("sim-seq-zero", [*S, "--seq-len", "0"], "seq"),
    ("sim-seq-long", [*S, "--seq-len", "100000"], "seq"),
    ("sim-device", [*S, "--device", "tpu"], "tpu"),
    ("sim-model", [*S, "--model", "nope"], "nope"),
    ("sim-model-garbage", [*S, "--model", "{bad}/garbage.txt"], "garbage.txt"),
    ("sim-model-neg", [*S, "--model", "{bad}/model_neg.json"], "n_layers=-1"),
    ("sim-model-unknown", [*S, "--model", "{bad}/model_unknown.json"], "layerz"),
    ("sim-model-list", [*S, "--model", "{bad}/model_list.json"], "model_list.json"),
    ("sim-profile-gpu", [*S, "--profile", "--device", "h100"], "--profile"),
    ("sim-out-dir", ["simulate", "--out", "{bad}"], "bad"),
    ("sim-out-under-file", ["simulate", "--out", "{bad}/a_file/sim.png"], "a_file"),
    ("sim-trace-dir", [*S, "--trace-json", "{bad}"], "bad"),
    ("sim-huge", ["simulate", "--model", "gpt2-1.5b", "--pp", "48", "--microbatches", "4096",
                  "--out", "{new}.png"],
     "too large"),
    ("sim-schedule", [*S, "--schedule", "nope"], "nope"),
    # -- schedule show ----------------------------------------------------------------
    ("show-pp-zero", [*SH, "--pp", "0"], "pp"),
    ("show-micro-zero", [*SH, "--microbatches", "0"], "microbatches"),
    ("show-virtual-zero", [*SH, "--virtual", "0"], "virtual"),
    ("show-virtual-zbv", [*SH, "--schedule", "zb-v", "--virtual", "3"], "3"),
    ("show-file-missing", [*SH, "--schedule-file", "{bad}/none.csv"], "none.csv"),
    ("show-file-garbage", [*SH, "--schedule-file", "{bad}/sched.csv"], "sched.csv"),
    ("show-file-binary", [*SH, "--schedule-file", "{bad}/binary.bin"], "binary.bin"),
    ("show-csv-dir", [*SH, "--csv", "{bad}"], "bad"),
    ("show-csv-under-file", [*SH, "--csv", "{bad}/a_file/s.csv"], "a_file"),
    ("show-no-action", ["schedule"], "ACTION"),
    # -- trace ------------------------------------------------------------------------
    ("trace-missing", ["trace", "{bad}/none"], "none"),
    ("trace-no-timeline", ["trace", "{run}"], "timeline.json"),
    ("trace-truncated", ["trace", "{bad}/trace_trunc"], "timeline.json"),
    ("trace-shape", ["trace", "{bad}/trace_shape"], "timeline.json"),
    ("trace-no-config", ["trace", "{bad}/trace_noconfig"], "config.json"),
    ("trace-bad-config", ["trace", "{bad}/trace_badconfig"], "config.json"),
    # -- report -----------------------------------------------------------------------
    ("report-missing", ["report", "{bad}/none"], "does not exist"),
    ("report-no-metrics", ["report", "{bad}"], "metrics.jsonl"),
    ("report-garbage", ["report", "{bad}/metrics_garbage"], "metrics.jsonl"),
    ("report-bad-row", ["report", "{bad}/metrics_badrow"], "metrics.jsonl"),
    ("report-metrics-dir", ["report", "{bad}/metrics_dir"], "metrics.jsonl"),
    ("report-out-dir", ["report", "{run}", "--out", "{bad}"], "bad"),
    ("report-out-under-file", ["report", "{run}", "--out", "{bad}/a_file/r.png"], "a_file"),
    # -- the CLI itself ---------------------------------------------------------------
    ("cli-no-command", [], "COMMAND"),
    ("cli-unknown-command", ["fly"], "fly"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (caches aside) with a hash of its content."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".cache"]
        if not dirnames and not filenames and os.listdir(dirpath):
            continue  # holds a cache alone: a run directory's default cache, made by reading data
        seen[os.path.relpath(dirpath, root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                seen[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return seen


@pytest.fixture(autouse=True)
def _no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    def spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was spawned for input that should have been rejected")

    for target in ("conveyor.runtime.launch.launch", "conveyor.train.trainer.launch",
                   "conveyor.train.evaluation.launch", "conveyor.commands.generate.launch",
                   "torch.multiprocessing.start_processes"):
        monkeypatch.setattr(target, spawn)


def test_cases_cover_every_subcommand() -> None:
    """At least 80 cases, and every subcommand has some."""
    assert len(CASES) >= 80
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {argv[0] for _, argv, _ in CASES if argv}
    assert {"train", "eval", "generate", "export", "import", "simulate", "schedule", "trace",
            "report"} <= commands


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line(argv: list[str], needle: str, paths: dict[str, str],
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(paths["root"]) / "work")
    argv = [a.format(**paths) for a in argv]
    needle = needle.format(**paths)
    before = _snapshot(Path(paths["root"]))
    code = main(argv)
    err = capsys.readouterr().err
    assert code not in (0, None), f"accepted: {argv}"
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln and not ln.startswith("[rank ")]
    assert len(errors) == 1, err
    assert ": error: " in errors[0] and needle in errors[0], errors[0]
    after = _snapshot(Path(paths["root"]))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the failed command wrote or changed {changed}"


def test_debug_shows_the_traceback(paths: dict[str, str],
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["report", f"{paths['bad']}/none"]
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
    monkeypatch.setenv("CONVEYOR_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


@pytest.mark.parametrize("argv", [["train", "--lr", "inf", "--steps", "3"],
                                  ["simulate", "--virtual", "0"], ["nope"]])
def test_console_script_prints_one_line(argv: list[str], tmp_path: Path) -> None:
    """The same through a real process: the exit status and stderr a shell sees."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "conveyor.cli", *argv], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_rank_error_is_its_first_line() -> None:
    """A rank's traceback becomes its exception's first line, not the last line of a grid."""
    import torch.multiprocessing as mp

    from conveyor.cli import _describe

    remote = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
              "conveyor.runtime.executor.PipelineError: training step 3: rank 1 failed at its "
              "action #0, 1RECV_F0 (stage 1, microbatch 0): timed out\nrank 1: [1RECV_F0] 1B0\n")
    code, line = _describe(mp.ProcessRaisedException(remote, 1, 123))
    assert code == 1 and line.startswith("rank 1: PipelineError: training step 3: rank 1 failed")
    assert "\n" not in line
    code, line = _describe(RuntimeError("Read error: Connection reset by peer"))
    assert code == 1 and "lost the connection to another rank" in line
