"""``conveyor export``: a checkpoint's model as model.safetensors + config.json + tokenizer.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..train.checkpoint import read_meta, resolve_checkpoint
from ..train.export import export_model

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``export`` to the CLI."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint's model as one model.safetensors with config.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint directory (RUN/checkpoints/step-N), or a run directory "
                        "to export its latest checkpoint")
    p.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to copy instead of the one the checkpoint names")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint(args.checkpoint)
    out = export_model(ckpt, args.out, tokenizer=args.tokenizer)
    step = read_meta(ckpt).get("step", "?")
    print(f"exported step {step} of {ckpt} to {out}")
    return 0
