"""``conveyor finetune``: fine-tune a pretrained model on a task, over pp x dp x tp ranks.

The model comes from ``--checkpoint`` (a Conveyor run or checkpoint, or an export) or
``--init`` (a Hugging Face or imported directory); its config and tokenizer are the
run's. The layout and loop flags are ``conveyor train``'s own (``train.add_options``),
with fine-tuning defaults; ``--resume`` continues a fine-tuning run with its task.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError, ParallelConfig, RunConfig, TrainConfig, to_dict
from ..data.task_local import BUILTIN
from ..log import setup_logging
from .train import add_options, checkpoint_config

__all__ = ["register", "FINETUNE_TRAIN"]

FINETUNE_TRAIN = TrainConfig(steps=200, batch_size=16, lr=5e-4, min_lr=5e-5, weight_decay=0.01,
                             eval_every=50, eval_batches=64, checkpoint_every=0)
"""The loop `conveyor finetune` runs when not told otherwise."""

_DEFAULTS: dict[str, Any] = {"parallel": ParallelConfig(), "train": FINETUNE_TRAIN}
_TASK_FIELDS = ("task", "val_task", "val_fraction", "target_len", "truncate", "generate")


def register(sub: Any) -> None:
    """Add ``finetune`` to the CLI."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model on a classification or seq2seq task",
        description="Fine-tune a model (from --checkpoint or --init) on --task: "
        f"{', '.join(BUILTIN)} (built from this Python's stdlib) or a .jsonl file with "
        "text/label (classification) or source/target (seq2seq) records. A classifier gets "
        "a new head. Writes RUN_DIR/NAME/ like `conveyor train`, with task.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--checkpoint", metavar="RUN_OR_CKPT", default=None,
                       help="a Conveyor run directory (its latest checkpoint), checkpoint or export")
    start.add_argument("--init", metavar="HF_DIR", default=None,
                       help="a Hugging Face model directory (or an imported one)")
    t = p.add_argument_group("task options")
    t.add_argument("--task", default=None, metavar="NAME_OR_FILE",
                   help=f"{' or '.join(BUILTIN)}, or a .jsonl file")
    t.add_argument("--val-task", default=None, metavar="FILE",
                   help="validation records (.jsonl); default: --val-fraction of --task")
    t.add_argument("--val-fraction", type=float, default=0.1, metavar="X",
                   help="share held out for validation (documents of a built-in task, "
                   "records of a file)")
    t.add_argument("--target-len", type=int, default=32, metavar="N",
                   help="tokens of a seq2seq target, its end token included")
    t.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the first tokens of inputs longer than the context (else an error)")
    t.add_argument("--generate", type=int, default=64, metavar="N",
                   help="validation examples generated at the end for BLEU/ROUGE-L (seq2seq)")
    add_options(p, _DEFAULTS, skip=("--init",))
    p.set_defaults(run=_run)


def _configs(args: argparse.Namespace) -> tuple[RunConfig, Any, Path | None]:
    from ..train.checkpoint import read_meta, resolve_checkpoint
    from ..train.finetune import TaskConfig

    overrides: dict[str, dict[str, Any]] = {"parallel": {}, "train": {}}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides[section][name] = value
    resume = overrides["train"].get("resume")
    task_values = {k: getattr(args, k) for k in _TASK_FIELDS}
    if resume is not None:
        if args.checkpoint or args.init:
            raise ConfigError("--resume continues a fine-tuning run from its own weights; drop "
                              "--checkpoint/--init")
        base = checkpoint_config(Path(resume))
        saved = read_meta(resolve_checkpoint(Path(resume))).get("task")
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume {resume} is no fine-tuning checkpoint (its meta has no "
                              "task); continue it with `conveyor train --resume`")
        task_values = {k: saved[k] for k in _TASK_FIELDS if k in saved}
        source = None
    else:
        if not (args.checkpoint or args.init):
            raise ConfigError("pass the model to fine-tune: --checkpoint RUN_OR_CKPT or "
                              "--init HF_DIR")
        if args.task is None:
            raise ConfigError(f"pass --task ({', '.join(BUILTIN)} or a .jsonl file)")
        base = {s: to_dict(c) for s, c in _DEFAULTS.items()}
        source = Path(args.checkpoint or args.init)
        from ..train.hf_io import init_config

        base["model"] = to_dict(init_config(source))
    merged = {s: {**base.get(s, {}), **overrides.get(s, {})} for s in ("parallel", "train")}
    merged["train"]["init"] = None
    run = RunConfig.from_dict({"model": base["model"], **merged})
    return run, TaskConfig(**task_values), source


def _run(args: argparse.Namespace) -> int:
    from ..train.finetune import run_finetune
    from ..train.metrics import METRICS_FILE, read_metrics
    from ..train.report import summarize

    setup_logging(os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    run, task, source = _configs(args)
    results = run_finetune(run, task, source)
    if not results or int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = results[min(results)]
    run_dir = Path(summary["run_dir"])
    task_meta = json.loads((run_dir / "task.json").read_text())
    if task_meta.get("text_to_text") or task_meta["kind"] != "classification":
        follow = f"conveyor generate --checkpoint {run_dir} --prompts-file FILE"
    else:
        follow = f"conveyor predict --checkpoint {run_dir} --text ..."
    table = summarize(read_metrics(run_dir / METRICS_FILE)).table(
        extra=[("checkpoint", summary["checkpoint"]), ("next", follow)])
    print(f"\nrun {run_dir}\n{table}")
    return 0
