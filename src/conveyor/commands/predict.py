"""``conveyor predict``: label texts with a fine-tuned classifier, pipelined over --pp ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..data.atomic import atomic_write
from ..log import setup_logging

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``predict`` to the CLI."""
    p = sub.add_parser(
        "predict",
        help="label texts with a fine-tuned classifier",
        description="Run a checkpoint of `conveyor finetune` (a classifier) forward over "
        "--pp ranks and write one JSON line per text: index, text, label, probabilities.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                   help="a fine-tuning run directory (its latest checkpoint) or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, metavar="FILE.jsonl",
                     help="records with a \"text\" field (a \"label\", if any, must be known)")
    src.add_argument("--text", action="append", metavar="TEXT",
                     help="a text to label (repeatable)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.jsonl",
                   help="where to write the predictions (default: stdout)")
    p.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline stages, one process each")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the first tokens of texts longer than the context (default: "
                   "as the model was fine-tuned)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds a rank waits for a peer")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..data.tasks import Record, read_inputs
    from ..train.predict import run_predict

    setup_logging(os.environ.get("CONVEYOR_LOG_LEVEL", "WARNING"))
    if args.pp < 1:
        raise ConfigError(f"--pp {args.pp} must be a positive integer")
    if args.input is not None:
        records = read_inputs(args.input)
    else:
        if not all(t.strip() for t in args.text):
            raise ConfigError("--text is empty; pass the text to label")
        records = [Record(t, "") for t in args.text]
    rows = run_predict(Path(args.checkpoint), records, pp=args.pp, truncate=args.truncate,
                       timeout_s=args.timeout)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        data = lines.encode("utf-8")
        atomic_write(args.out, lambda f: f.write(data))  # never a half-written file
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    return 0
