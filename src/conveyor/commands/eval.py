"""``conveyor eval``: validation loss and perplexity of a checkpoint, through any pipeline layout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..config import PARTITIONS, ParallelConfig, from_dict
from .checks import positive

__all__ = ["register"]

_LAYOUT = ("pp", "dp", "tp", "sequence_parallel", "schedule", "microbatches", "virtual_stages",
           "partition")


def register(sub: Any) -> None:
    """Add ``eval`` to the CLI."""
    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint (any --pp)",
        description="Run a checkpoint's validation batches forward through a pipeline, which "
        "may be laid out differently from training, and print the mean loss and perplexity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                   default=argparse.SUPPRESS,
                   help="a checkpoint directory (RUN/checkpoints/step-N), or a run directory "
                   "to evaluate its latest checkpoint")
    same = "(default: the checkpoint's)"
    sup = argparse.SUPPRESS
    p.add_argument("--pp", type=int, metavar="N", default=sup, help=f"pipeline stages {same}")
    p.add_argument("--dp", type=int, metavar="N", default=sup, help=f"data-parallel replicas {same}")
    p.add_argument("--tp", type=int, metavar="N", default=sup, help=f"tensor-parallel ranks {same}")
    p.add_argument("--sequence-parallel", dest="sequence_parallel",
                   action=argparse.BooleanOptionalAction, default=sup,
                   help=f"split the sequence over the tp ranks {same}")
    p.add_argument("--schedule", metavar="NAME", default=sup, help=f"schedule whose forwards run {same}")
    p.add_argument("--microbatches", type=int, metavar="N", default=sup, help=f"microbatches per batch {same}")
    p.add_argument("--virtual-stages", dest="virtual_stages", type=int, metavar="N", default=sup,
                   help=f"model chunks per rank {same}")
    p.add_argument("--partition", metavar="HOW", default=sup,
                   help=f"{', '.join(PARTITIONS)} {same}")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", default=sup,
                   help=f"sequences per batch {same}")
    p.add_argument("--batches", type=int, metavar="N", default=sup,
                   help="validation batches to average (default: the checkpoint's eval_batches)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=300.0,
                   help="seconds a rank waits for a peer before failing (default: 300)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..log import setup_logging
    from ..train.checkpoint import read_meta, resolve_checkpoint
    from ..train.evaluation import run_evaluation

    setup_logging(os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    positive(getattr(args, "batch_size", None), "--batch-size")
    positive(getattr(args, "batches", None), "--batches")
    positive(args.timeout, "--timeout", integer=False)
    ckpt = resolve_checkpoint(args.checkpoint)
    saved = read_meta(ckpt).get("parallel") or {}
    layout = {k: v for k, v in saved.items() if k in _LAYOUT}
    if "schedule" in vars(args) and args.schedule != layout.get("schedule"):
        layout["virtual_stages"] = None  # the saved one belonged to the saved schedule
    if getattr(args, "tp", None) == 1 and "sequence_parallel" not in vars(args):
        layout["sequence_parallel"] = False  # the saved one needed the saved tp
    layout.update({k: v for k, v in vars(args).items() if k in _LAYOUT})
    par = from_dict(ParallelConfig, layout, f"checkpoint {ckpt} parallel config")
    result = run_evaluation(ckpt, par, batch_size=getattr(args, "batch_size", None),
                            batches=getattr(args, "batches", None), timeout_s=args.timeout)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"step {result['step']} of {result['checkpoint']}: val_loss "
              f"{result['val_loss']:.4f}  perplexity {result['val_ppl']:.2f}  "
              f"({result['batches']} batches of {result['batch_size']} sequences, "
              f"pp={par.pp} dp={par.dp} tp={par.tp} {par.schedule})")
    return 0
