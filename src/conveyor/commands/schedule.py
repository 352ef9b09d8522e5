"""``conveyor schedule show``: print a schedule's table and the validator's figures."""

from __future__ import annotations

import argparse
from typing import Any

from ..schedules import SCHEDULES
from ..schedules.describe import describe
from ..schedules.table_file import write_schedule_csv
from .checks import output_file, positive

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``schedule show`` to the CLI."""
    p = sub.add_parser("schedule", help="show, check and export pipeline schedules")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = ssub.add_parser(
        "show",
        help="print a schedule's per-rank actions, clock table, bubble and peak activations",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    show.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULES),
                      help="schedule name")
    show.add_argument("--schedule-file", default=None,
                      help="a hand-written CSV schedule to validate and show instead")
    show.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    show.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    show.add_argument("--virtual", type=int, default=None,
                      help="model chunks per rank (default: what the schedule needs)")
    show.add_argument("--csv", default=None, help="also write the schedule as a CSV table here")
    show.add_argument("--csv-style", default="conveyor", choices=["conveyor", "torch"],
                      help="CSV form: Conveyor's (header and rank column) or torch's "
                      "(what torch.distributed.pipelining's _load_csv reads)")
    show.set_defaults(run=_show)


def _show(args: argparse.Namespace) -> int:
    from ..parallel.layout import resolve_schedule

    for flag in ("pp", "microbatches", "virtual"):
        positive(getattr(args, flag), f"--{flag}")
    if args.csv:
        output_file(args.csv, "--csv")
    schedule = resolve_schedule(name=args.schedule, pp=args.pp, microbatches=args.microbatches,
                                virtual_stages=args.virtual,
                                schedule_file=args.schedule_file or None)
    print(describe(schedule))
    if args.csv:
        write_schedule_csv(schedule, args.csv, style=args.csv_style)
        print(f"\nwrote {args.csv}")
    return 0
