"""Simulated pipeline steps: cost models, the step simulator and timeline rendering."""

from __future__ import annotations

from .analytic import DEVICES, Device, analytic_costs, get_device, measure_cpu_flops
from .cost import CostError, CostModel
from .profile import profile_costs
from .render import (
    Timeline,
    chrome_trace,
    render_comparison,
    render_gantt,
    timeline_stats,
    write_chrome_trace,
)
from .simulate import SimResult, peak_memory, simulate

__all__ = [
    "CostError",
    "CostModel",
    "DEVICES",
    "Device",
    "SimResult",
    "Timeline",
    "analytic_costs",
    "chrome_trace",
    "get_device",
    "measure_cpu_flops",
    "peak_memory",
    "profile_costs",
    "render_comparison",
    "render_gantt",
    "simulate",
    "timeline_stats",
    "write_chrome_trace",
]
