"""``conveyor export``: a model as one directory, in Conveyor's format or Hugging Face's.

``--format conveyor`` (the default) writes model.safetensors + config.json +
tokenizer.json; ``--format hf`` writes a directory ``transformers`` loads with
``from_pretrained`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
``T5ForConditionalGeneration``, ``BertForMaskedLM``, ``BertForSequenceClassification``) and ``AutoTokenizer`` reads, sharded above ``--max-shard-size``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.tokenizer import check_tokenizer_fits, load_tokenizer
from ..models.hf_families import family_of
from ..train.checkpoint import read_meta, resolve_checkpoint
from ..train.checkpoint_files import checkpoint_tokenizer
from ..train.export import TOKENIZER_FILE, is_exported, read_model, write_export
from ..train.hf_io import DEFAULT_MAX_SHARD_SIZE, parse_size, write_hf
from .checks import output_dir

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``export`` to the CLI."""
    p = sub.add_parser(
        "export",
        help="write a model as one directory (Conveyor's format, or Hugging Face's)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint directory (RUN/checkpoints/step-N), a run directory "
                        "to export its latest checkpoint, or an exported or imported model")
    p.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to copy instead of the one the checkpoint names")
    p.add_argument("--format", choices=("conveyor", "hf"), default="conveyor",
                   help="conveyor: config.json + model.safetensors for Conveyor; hf: a "
                        "Hugging Face transformers directory (GPT2LMHeadModel, LlamaForCausalLM, "
                        "T5ForConditionalGeneration, BertForMaskedLM, "
                        "BertForSequenceClassification)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help="with --format hf: split the weights into files of at most this size "
                        "(e.g. 5GB, 500MB), listed in model.safetensors.index.json")
    p.set_defaults(run=_export)


def _own_tokenizer(path: Path) -> Path | None:
    """The tokenizer a checkpoint or export came with (what --tokenizer replaces)."""
    if is_exported(path):
        own = path / TOKENIZER_FILE
        return own if own.is_file() else None
    ckpt = resolve_checkpoint(path)
    return checkpoint_tokenizer(ckpt, read_meta(ckpt))


def _export(args: argparse.Namespace) -> int:
    max_bytes = parse_size(args.max_shard_size)  # a bad size fails before any reading
    output_dir(args.out, "--out")
    model = read_model(args.checkpoint, tokenizer=args.tokenizer)
    if model.tokenizer is not None:  # copying a broken or foreign tokenizer helps nobody
        own = _own_tokenizer(args.checkpoint) if args.tokenizer is not None else None
        check_tokenizer_fits(load_tokenizer(model.tokenizer), model.tokenizer,
                             model.cfg.vocab_size, own)
    what = model.source if model.step is None else f"step {model.step} of {model.source}"
    if args.format == "hf":
        files = write_hf(args.out, model, max_shard_size=max_bytes)
        weights = sum(f.endswith(".safetensors") for f in files)
        print(f"exported {what} to {args.out} as Hugging Face {family_of(model.cfg).architecture} "
              f"({weights} weight file{'s' if weights > 1 else ''})")
    else:
        write_export(args.out, model.cfg, model.tensors, model.tokenizer, model.labels)
        print(f"exported {what} to {args.out}")
    return 0
