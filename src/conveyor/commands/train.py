"""``conveyor train``: train a transformer over pp x dp x tp ranks, from flags and/or a TOML file.

Values come from, lowest priority first: the defaults below (or, with ``--resume``,
the checkpoint's config), ``--config FILE.toml`` ([model] [parallel] [train] [data]
with the config classes' field names), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import (
    RECOMPUTE_MODES,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    check_fields,
    to_dict,
)
from ..log import setup_logging
from ..runtime.launch import Preempted
from ..schedules import SCHEDULES

__all__ = ["register", "DEFAULT_MODEL", "add_options", "checkpoint_config", "load_toml",
           "build_run_config"]

DEFAULT_MODEL = ModelConfig(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, max_seq_len=128)
"""The model `conveyor train` trains when not told otherwise: a few minutes on a laptop CPU."""

_DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL, "parallel": ParallelConfig(), "train": TrainConfig(),
    "data": DataConfig(),
}

def _recompute_mode(text: str) -> bool | str:
    if text not in RECOMPUTE_MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    return RECOMPUTE_MODES[text]


_TRAINABLE = ", ".join(s for s in sorted(SCHEDULES) if s != "forward-only")
_BOOL = argparse.BooleanOptionalAction
_METAVARS: dict[Any, str] = {int: "N", float: "X"}

# (section, field, flag, argparse keywords, help)
_OPTIONS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("model", "family", "--family", {"metavar": "NAME"}, "gpt (causal LM), bert (encoder: "
     "masked LM + next sentence) or t5 (encoder-decoder: span corruption, --layers of each)"),
    ("model", "flavour", "--flavour", {"metavar": "NAME"}, "gpt2 (LayerNorm, GELU, learned positions) or "
     "llama (RMSNorm, SwiGLU, rotary)"),
    ("model", "n_layers", "--layers", {"type": int}, "transformer blocks"),
    ("model", "d_model", "--d-model", {"type": int}, "hidden width"),
    ("model", "n_heads", "--heads", {"type": int}, "attention heads (must divide --d-model)"),
    ("model", "n_kv_heads", "--kv-heads", {"type": int},
     "key/value heads for grouped-query attention, llama only (None: --heads)"),
    ("model", "d_ff", "--d-ff", {"type": int},
     "MLP width (None: 4*d_model for gpt2, about 8/3*d_model for llama)"),
    ("model", "vocab_size", "--vocab-size", {"type": int},
     "BPE vocabulary trained on the corpus, and the model's token ids"),
    ("model", "max_seq_len", "--seq-len", {"type": int}, "tokens per training sequence"),
    ("model", "tie_embeddings", "--tie-embeddings", {"action": _BOOL},
     "share the token embedding with the LM head"),
    ("model", "norm_eps", "--norm-eps", {"type": float}, "epsilon of the norms"),
    ("model", "rope_theta", "--rope-theta", {"type": float}, "rotary base (llama only)"),
    ("model", "init_std", "--init-std", {"type": float}, "std of the initial weights"),
    ("parallel", "pp", "--pp", {"type": int}, "pipeline stages, one process each"),
    ("parallel", "dp", "--dp", {"type": int},
     "data-parallel pipeline replicas (pp*dp*tp processes in all)"),
    ("parallel", "tp", "--tp", {"type": int},
     "tensor-parallel ranks per stage: attention heads, MLP width and vocabulary split "
     "Megatron-style (must divide --heads, --kv-heads and the MLP width)"),
    ("parallel", "sequence_parallel", "--sequence-parallel", {"action": _BOOL},
     "with --tp > 1, also split norms, residuals and stage boundaries along the sequence "
     "(--seq-len must be a multiple of --tp)"),
    ("parallel", "schedule", "--schedule", {"metavar": "NAME"}, f"pipeline schedule: {_TRAINABLE}"),
    ("parallel", "schedule_file", "--schedule-file", {"metavar": "FILE.csv"},
     "a hand-written schedule table, validated before training; replaces --schedule "
     "(None: use --schedule; write one with `conveyor schedule show --csv FILE`)"),
    ("parallel", "microbatches", "--microbatches", {"type": int},
     "microbatches per step per replica (must divide --batch-size/--dp)"),
    ("parallel", "virtual_stages", "--virtual-stages", {"type": int},
     "model chunks per rank (None: what the schedule needs, 2 for interleaved and zb-v)"),
    ("parallel", "recompute", "--recompute", {"nargs": "?", "const": True, "metavar": "MODE",
                                               "type": _recompute_mode},
     "recompute activations in backward instead of keeping them: full (the flag alone; less "
     "memory, ~1/3 slower), selective (only the attention core) or none"),
    ("parallel", "compile", "--compile", {"action": _BOOL},
     "torch.compile every block, split backward included (the first step compiles; on CPU "
     "it needs a C++ compiler)"),
    ("parallel", "lend_cores", "--lend-cores", {"action": _BOOL},
     "on CPU, run warm-up and cool-down actions that no other rank can run alongside on "
     "the idle ranks' cores too (faster on a machine doing nothing else, slower on "
     "a busy one)"),
    ("parallel", "partition", "--partition", {"metavar": "HOW"},
     "blocks to stages: uniform (equal layer counts), params (balanced parameter counts) or "
     "cost (balanced predicted compute, embedding and head included)"),
    ("parallel", "partition_costs", "--partition-costs", {"metavar": "HOW"},
     "what --partition cost balances: analytic (FLOPs of each block) or profile (each "
     "block's forward + backward timed on this machine before training, a few seconds)"),
    ("parallel", "dp_bucket_mb", "--dp-bucket-mb", {"type": float},
     "MiB per data-parallel gradient all-reduce, started as soon as backward finishes "
     "its parameters (0: one all-reduce per parameter after the step)"),
    ("parallel", "zero", "--zero", {"type": int},
     "1: ZeRO-1, each data-parallel replica keeps AdamW state for 1/dp of the parameters "
     "and the updated parameters are all-gathered (0: off)"),
    ("train", "steps", "--steps", {"type": int}, "optimizer steps in total"),
    ("train", "batch_size", "--batch-size", {"type": int}, "sequences per step (global batch)"),
    ("train", "lr", "--lr", {"type": float}, "peak learning rate of AdamW"),
    ("train", "min_lr", "--min-lr", {"type": float}, "learning rate at the end of the cosine decay"),
    ("train", "warmup", "--warmup", {"type": int},
     "steps of linear learning-rate warmup, fewer than --steps (None: min(50, steps/10))"),
    ("train", "weight_decay", "--weight-decay", {"type": float},
     "decoupled weight decay of matrices (not of norms and biases)"),
    ("train", "grad_clip", "--grad-clip", {"type": float},
     "clip gradients to this global norm over all stages (0: no clipping)"),
    ("train", "eval_every", "--eval-every", {"type": int},
     "steps between validation runs, besides step 0 and the end (0: only those)"),
    ("train", "eval_batches", "--eval-batches", {"type": int},
     "validation batches per evaluation (always the same ones)"),
    ("train", "checkpoint_every", "--checkpoint-every", {"type": int},
     "steps between checkpoints, besides the end (0: only at the end)"),
    ("train", "keep", "--keep", {"type": int}, "newest checkpoints to keep (0: all)"),
    ("train", "seed", "--seed", {"type": int}, "seed of the weights, the val split, the batch order"),
    ("train", "bf16", "--bf16", {"action": _BOOL}, "bfloat16 autocast for forward and backward"),
    ("train", "trace", "--trace", {"action": _BOOL},
     "record every action of the last step on every rank into timeline.json and a "
     "Chrome/Perfetto trace.json; `conveyor trace RUN` draws it beside its simulation"),
    ("train", "timeout", "--timeout", {"type": float, "metavar": "SECONDS"},
     "seconds a rank waits for a peer (pipeline messages, collectives, checkpoint saves) "
     "before the run fails naming what it waited for"),
    ("train", "tensorboard", "--tensorboard", {"action": _BOOL},
     "also write loss, lr, grad norm, tokens/s and validation metrics as TensorBoard "
     "scalars in RUN_DIR/NAME/tensorboard (`tensorboard --logdir RUN_DIR`)"),
    ("train", "run_dir", "--run-dir", {"metavar": "DIR"}, "directory holding one subdirectory per run"),
    ("train", "name", "--name", {"metavar": "NAME"}, "this run's subdirectory (None: the start time)"),
    ("train", "resume", "--resume", {"metavar": "RUN_DIR_OR_CKPT"},
     "continue from a checkpoint, or a run directory's latest one, in a new run directory; "
     "model, data, batch size and seed come from the checkpoint, other flags override. "
     "'auto' (with --name, for restarts such as torchrun --max-restarts): continue the run "
     "--name in place from its newest intact checkpoint, or start it if it has none"),
    ("train", "init", "--init", {"metavar": "HF_DIR"},
     "start from a model: a Hugging Face directory (GPT2LMHeadModel, LlamaForCausalLM), a "
     "Conveyor export or checkpoint; its weights, model config and tokenizer are the run's, "
     "so model options must be left out"),
    ("data", "paths", "--data", {"nargs": "+", "action": "extend", "metavar": "PATH"},
     "text files, directories or globs; .jsonl/.json files hold records with a \"text\" field, "
     ".parquet/.arrow tables a \"text\" column "
     "(None: the source files of this Python's standard library, "
     f"{Path(os.__file__).parent})"),
    ("data", "val_fraction", "--val-fraction", {"type": float},
     "share of sequences held out for validation (0: no evaluation)"),
    ("data", "cache_dir", "--cache-dir", {"metavar": "DIR"},
     "cache of the tokenizer and tokenized corpus (None: RUN_DIR/.cache)"),
]


def register(sub: Any) -> None:
    """Add ``train`` to the CLI."""
    p = sub.add_parser(
        "train",
        help="train a transformer with pipeline, tensor and data parallelism (spawns "
        "pp*dp*tp processes)",
        description="Train a transformer (--family gpt, bert or t5) over pp*dp*tp processes (gloo on CPU, NCCL "
        "on GPU; under torchrun, joins its group). Writes RUN_DIR/NAME/ with config.json, "
        "metrics.jsonl, tokenizer.json and checkpoints/. Priority: defaults < --config < flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                   help="TOML file with [model] [parallel] [train] [data] tables of config "
                   "field names (e.g. n_layers = 6); flags override it")
    add_options(p, _DEFAULTS)
    p.set_defaults(run=_run)


def add_options(p: argparse.ArgumentParser, defaults: dict[str, Any],
                skip: tuple[str, ...] = ()) -> None:
    """The flags of the config fields of ``defaults``' sections (but ``skip``), each under
    ``dest="section.field"``, absent unless given; help shows ``defaults``' values."""
    groups = {s: p.add_argument_group(f"{s} options") for s in defaults}
    for section, field, flag, kwargs, text in _OPTIONS:
        if section not in defaults or flag in skip:
            continue
        default = getattr(defaults[section], field)
        if default is None and "(None: " in text:
            text = text.replace("(None: ", "(default: ")
        else:
            text = f"{text} (default: {default})"
        if "action" not in kwargs:
            kwargs = {"metavar": _METAVARS.get(kwargs.get("type"), "STR"), **kwargs}
        # SUPPRESS: a flag left out leaves no attribute, so it cannot override the TOML file
        groups[section].add_argument(
            flag, dest=f"{section}.{field}", default=argparse.SUPPRESS, help=text, **kwargs
        )


def load_toml(path: Path) -> dict[str, dict[str, Any]]:
    """The sections of a TOML config file, every key checked against the config fields."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist; pass an existing TOML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path} cannot be read ({err}); pass a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path} is not valid TOML ({err}); fix the syntax") from None
    for section, values in raw.items():
        if section not in RunConfig.SECTIONS:
            known = ", ".join(f"[{s}]" for s in RunConfig.SECTIONS)
            raise ConfigError(f"{path}: unknown key {section!r} (a section or top-level key); "
                              f"put options under {known}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section!r} must be a table [{section}], not a value")
        check_fields(RunConfig.SECTIONS[section], values, f"{path} [{section}]")
    return raw


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults (or the resumed checkpoint's config) < --config TOML < flags."""
    overrides: dict[str, dict[str, Any]] = {s: {} for s in _DEFAULTS}
    if args.config is not None:
        for section, values in load_toml(args.config).items():
            overrides[section].update(values)
    for key, value in vars(args).items():
        if "." in key:
            section, field = key.split(".", 1)
            overrides[section][field] = value
    base = {s: to_dict(c) for s, c in _DEFAULTS.items()}
    resume, init = overrides["train"].get("resume"), overrides["train"].get("init")
    if resume is not None and init is not None:
        TrainConfig(resume=resume, init=init)  # refuses the pair before reading either
    if resume is not None and resume != "auto":  # auto: the same flags as the first start
        base = checkpoint_config(Path(resume))
    if init is not None:  # the model is the one --init names; options that differ are refused later
        from ..train.hf_io import init_config

        base["model"] = to_dict(init_config(Path(init)))
    merged = {s: {**base[s], **overrides[s]} for s in base}
    return RunConfig.from_dict(merged, "--config" if args.config is None else str(args.config))


def checkpoint_config(resume: Path) -> dict[str, dict[str, Any]]:
    """The config sections a checkpoint was trained with, set to resume it."""
    from ..train.checkpoint import read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(resume)
    meta = read_meta(ckpt)
    missing = [s for s in _DEFAULTS if not isinstance(meta.get(s), dict)]
    if missing:
        raise ConfigError(f"--resume {ckpt}: its meta.json has no {', '.join(missing)} config; "
                          "resume a checkpoint written by `conveyor train`")
    base = {s: dict(meta[s]) for s in _DEFAULTS}
    for section, kind in RunConfig.SECTIONS.items():  # keys of an older version are dropped
        names = {f.name for f in dataclasses.fields(kind)}
        base[section] = {k: v for k, v in base[section].items() if k in names}
    base["train"].update(name=None, resume=str(ckpt), init=None)  # its weights are the checkpoint's
    return base


def _run(args: argparse.Namespace) -> int:
    from ..train.metrics import METRICS_FILE, read_metrics
    from ..train.report import summarize
    from ..train.trainer import run_training

    setup_logging(os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    run = build_run_config(args)
    results = run_training(run)
    if not results:
        return 0
    summary = results[min(results)]
    run_dir = Path(summary["run_dir"])
    if summary.get("preempted"):  # every rank leaves with the same status
        signum = int(summary["preempted"])
        again = (f"--resume auto --name {run.train.name}" if run.train.resume == "auto"
                 else f"--resume {run_dir}")
        raise Preempted(f"stopped by {signal.Signals(signum).name} at step {summary['steps']} of "
                        f"{run.train.steps}; saved {summary['checkpoint']}; continue with "
                        f"`conveyor train {again}`", signum)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0

    table = summarize(read_metrics(run_dir / METRICS_FILE)).table(
        extra=[("checkpoint", summary["checkpoint"]), ("next", f"conveyor report {run_dir}")]
    )
    print(f"\nrun {run_dir}\n{table}")
    return 0
