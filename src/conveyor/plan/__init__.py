"""`conveyor plan`: choose dp x pp x tp, schedule, microbatches, recompute, SP and ZeRO-1."""

from __future__ import annotations

from .cluster import Cluster, load_device
from .estimate import (
    Candidate,
    Estimate,
    estimate,
    model_flops,
    profiled_costs,
    simulate_candidate,
)
from .planner import SCHEDULES, Plan, candidates, plan
from .report import table, to_toml, why, write_toml

__all__ = [
    "Candidate",
    "Cluster",
    "Estimate",
    "Plan",
    "SCHEDULES",
    "candidates",
    "estimate",
    "load_device",
    "model_flops",
    "plan",
    "profiled_costs",
    "simulate_candidate",
    "table",
    "to_toml",
    "why",
    "write_toml",
]
