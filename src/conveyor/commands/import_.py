"""``conveyor import``: a Hugging Face model directory as a Conveyor export.

Reads config.json, model.safetensors (or its shards and index) and tokenizer.json
of a ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``T5ForConditionalGeneration`` or BERT and
writes what ``conveyor export`` writes, so ``conveyor generate --checkpoint OUT`` runs it. (The module is ``import_``
because ``import`` is a Python keyword.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..data.errors import DataError
from ..data.tokenizer import TOKENIZER_CONFIG, load_tokenizer
from ..train.export import TOKENIZER_FILE
from ..train.hf_io import import_hf
from .checks import output_dir

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``import`` to the CLI."""
    p = sub.add_parser(
        "import",
        help="convert a Hugging Face model directory (GPT-2, Llama, T5, BERT) into a Conveyor export",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR",
                   help="a directory written by transformers' save_pretrained (config.json, "
                        "safetensors weights, tokenizer.json)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    p.set_defaults(run=_import)


def _import(args: argparse.Namespace) -> int:
    output_dir(args.out, "--out")
    done = import_hf(args.hf_dir, args.out)
    cfg = done.cfg
    print(f"imported {done.architecture} ({cfg.family}, {cfg.flavour}, {cfg.n_layers} layers, d_model "
          f"{cfg.d_model}, vocab {cfg.vocab_size}) from {args.hf_dir} to {done.out_dir}")
    if not done.tokenizer:
        print(f"conveyor import: note: {args.hf_dir} has no {TOKENIZER_FILE}; pass "
              "--tokenizer PATH/tokenizer.json to `conveyor generate`", file=sys.stderr)
        return 0
    try:
        load_tokenizer(done.out_dir / TOKENIZER_FILE)
    except DataError:  # the weights are fine; only generation needs to know the end token
        print(f"conveyor import: note: the tokenizer names no end-of-text token that it holds; "
              f"set \"eos_token\" in {done.out_dir / TOKENIZER_CONFIG} before generating",
              file=sys.stderr)
    return 0
