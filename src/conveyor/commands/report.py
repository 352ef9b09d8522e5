"""``conveyor report RUN_DIR``: loss and perplexity curves as a PNG, and a summary table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.errors import DataError
from .checks import output_file

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``report`` to the CLI."""
    p = sub.add_parser(
        "report",
        help="draw a run's loss and perplexity curves and print its summary",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a run directory written by `conveyor train` (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (None: RUN_DIR/report.png)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..train.metrics import METRICS_FILE, read_metrics
    from ..train.report import plot_run, summarize

    path = args.run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not args.run_dir.exists() else f"has no {METRICS_FILE}"
        raise FileNotFoundError(
            f"{args.run_dir} {what}; pass a run directory written by `conveyor train` "
            "(e.g. runs/<name>)"
        )
    out = output_file(args.out or args.run_dir / "report.png", "--out")
    rows = read_metrics(path)
    if not rows:
        raise DataError(f"{path} has no rows yet; report a run that has trained at least one step")
    out = plot_run(rows, out, title=args.run_dir.name)
    print(summarize(rows).table())
    print(f"\nwrote {out}")
    return 0
