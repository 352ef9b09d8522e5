"""``conveyor trace RUN_DIR``: the traced step of a run drawn above its simulation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from .checks import output_file

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``trace`` to the CLI."""
    p = sub.add_parser(
        "trace",
        help="draw a run's measured step (train --trace) above the simulator's prediction",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="run directory of a `conveyor train --trace` run")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/trace.png)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..parallel.layout import resolve_layout
    from ..runtime.stage import StageRunner
    from ..sim import profile_costs, render_comparison, simulate, write_chrome_trace
    from ..sim.timeline_io import load_timeline
    from ..train.rundir import CONFIG_FILE, TIMELINE_FILE

    run_dir: Path = args.run_dir
    timeline_path = run_dir / TIMELINE_FILE
    if not timeline_path.is_file():
        raise ConfigError(
            f"{run_dir} has no {TIMELINE_FILE}; train with `conveyor train --trace` to record one"
        )
    out = output_file(args.out or run_dir / "trace.png", "--out")
    try:
        raw = json.loads((run_dir / CONFIG_FILE).read_text())
        run = RunConfig.from_dict({k: raw[k] for k in RunConfig.SECTIONS if k in raw}, str(run_dir))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}; pass a run directory") from None
    except (ValueError, TypeError, AttributeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{run_dir / CONFIG_FILE} is corrupt ({err}); pass a run directory "
                          "written by `conveyor train`") from None
    try:
        measured, meta = load_timeline(timeline_path)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError(f"{timeline_path} is not a timeline written by `conveyor train "
                          f"--trace` ({type(err).__name__}: {err}); record it again") from None
    par, model = run.parallel, run.model
    layout = resolve_layout(model, par, batch_size=run.train.batch_size)
    schedule = layout.schedule
    assert layout.microbatch_size is not None  # the batch size was given
    cost = profile_costs(model, layout.partition, microbatch_size=layout.microbatch_size,
                         seq_len=model.max_seq_len, runner=StageRunner)
    sim = simulate(schedule, cost)

    from ..schedules.validate import Execution

    real = Execution(measured)
    print(f"{schedule.name}, pp={par.pp}, {par.microbatches} microbatches, step {meta.get('step')}")
    print(f"{'':<10}{'step ms':>10}{'bubble':>9}")
    print(f"{'measured':<10}{real.makespan * 1e3:>10.1f}{real.bubble_fraction():>9.1%}")
    print(f"{'simulated':<10}{sim.step_time * 1e3:>10.1f}{sim.bubble_fraction:>9.1%}")
    render_comparison(real.timeline, sim.timeline, out,
                      title=f"{schedule.name}, pp={par.pp}, m={par.microbatches}")
    both = write_chrome_trace({"measured": measured, "simulated": sim.timeline},
                              run_dir / "trace_vs_sim.json")
    print(f"\nwrote {out}\nwrote {both} (open in ui.perfetto.dev or chrome://tracing)")
    return 0
