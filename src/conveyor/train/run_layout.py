"""A training run's Layout, decided once in the parent before anything is read or
spawned: on the analytic block costs, or (``partition_costs='profile'``) on the forward
and backward of each block timed on this machine first."""

from __future__ import annotations

import time

from ..config import ConfigError, RunConfig
from ..parallel.layout import Layout, resolve_layout

__all__ = ["run_layout"]


def run_layout(run: RunConfig) -> Layout:
    """The run's Layout; with ``partition_costs='profile'`` on block costs timed here first."""
    par = run.parallel
    if par.partition_costs != "profile" or par.partition != "cost":
        return resolve_layout(run.model, par, batch_size=run.train.batch_size)
    from ..sim.block_profile import profile_block_costs

    if run.model.family != "gpt" or run.model.num_labels:
        what = f"family={run.model.family!r}" if run.model.family != "gpt" else "a classifier"
        raise ConfigError(f"partition_costs='profile' times language-model decoder blocks only; "
                          f"{what} uses partition_costs='analytic'")
    par.check_against(run.model, run.train.batch_size)  # before spending the seconds
    t0 = time.perf_counter()
    mbs = run.train.batch_size // (par.dp * par.microbatches)
    costs = profile_block_costs(run.model, microbatch_size=mbs, seq_len=run.model.max_seq_len,
                                seed=run.train.seed)
    source = (f"forward + backward of each block timed here, microbatch {mbs} x "
              f"{run.model.max_seq_len}, {time.perf_counter() - t0:.1f}s")
    return resolve_layout(run.model, par, batch_size=run.train.batch_size, block_costs=costs,
                          cost_source=source)
