"""Simulate one training step of a schedule under a cost model.

The clock is the validator's own engine, :func:`conveyor.schedules.validate.execute`,
run on the lowered schedule, so the simulator and the validator cannot disagree
about dependencies. Costs enter as:

- F, I and W occupy their rank for ``cost.f/b/w[stage]`` seconds; a B (a full
  backward) for ``cost.full_b[stage]``, or ``b + w`` when that was not measured; an
  overlapped F/B pair for the sum of its two parts;
- a SEND occupies no compute time (the runtime posts it asynchronously); the
  message reaches its RECV ``cost.transfer_time()`` after the SEND, and the wait
  shows as idle time before the RECV. Messages do not contend for the link.

Memory per rank = parameters + gradients + optimizer state of its stages (all
step long) + the peak of held activations while walking its actions in order, by
the validator's one definition
(:func:`~conveyor.schedules.validate.activation_events`): an F adds its stage's
``activation_bytes``; its B frees them, or its W when the backward is split (the
inputs of every matmul live until the weight-grad). Transient tensors inside one
action are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.schedules import Schedule, execute, lower
from conveyor.schedules.ir import Action
from conveyor.schedules.validate import Execution, TimedAction, peak_activations

from .cost import CostError, CostModel

__all__ = ["SimResult", "simulate", "peak_memory"]

_MIB = 2**20


@dataclass(frozen=True)
class SimResult:
    """A simulated step: the timed actions of every rank and what they add up to."""

    schedule: Schedule
    """The lowered schedule that was run."""
    cost: CostModel
    execution: Execution
    peak_activation_bytes: dict[int, int]
    """Per rank: most bytes of activations held at once (F done, B or W not yet)."""
    peak_memory_bytes: dict[int, int]
    """Per rank: parameters, gradients and optimizer state plus peak activations."""

    @property
    def timeline(self) -> dict[int, list[TimedAction]]:
        """Per-rank timed actions (seconds), as the runtime records measured ones."""
        return self.execution.timeline

    @property
    def step_time(self) -> float:
        """Seconds from the first action to the last (the makespan)."""
        return self.execution.makespan

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks over the step."""
        return self.execution.bubble_fraction()

    def table(self) -> str:
        """Summary for the CLI: one header line, then one row per rank."""
        step = self.step_time
        sched = self.schedule
        lines = [
            f"schedule {sched.name}: {sched.num_ranks} ranks, {sched.num_stages} stages, "
            f"{sched.num_microbatches} microbatches; step {step * 1e3:.3f} ms, "
            f"bubble {self.bubble_fraction:.1%}  [{self.cost.source or 'costs'}]",
            f"{'rank':>4}  {'stages':<8} {'busy ms':>9} {'idle ms':>9} {'idle':>6}  "
            f"{'peak act MiB':>12}  {'peak mem MiB':>12}",
        ]
        for rank in sorted(self.timeline):
            busy = self.execution.busy(rank)
            stages = ",".join(map(str, sched.placement.stages_of(rank)))
            idle = step - busy
            lines.append(
                f"{rank:>4}  {stages:<8} {busy * 1e3:>9.3f} {idle * 1e3:>9.3f} "
                f"{(idle / step if step else 0.0):>6.1%}  "
                f"{self.peak_activation_bytes[rank] / _MIB:>12.2f}  "
                f"{self.peak_memory_bytes[rank] / _MIB:>12.2f}"
            )
        return "\n".join(lines)


def peak_memory(schedule: Schedule, cost: CostModel) -> tuple[dict[int, int], dict[int, int]]:
    """Per rank (peak held activation bytes, peak total bytes) walking its actions."""
    peak_act = peak_activations(schedule, lambda stage: cost.activation_bytes[stage])
    peak_total = {
        rank: peak + sum(cost.static_bytes(s) for s in schedule.placement.stages_of(rank))
        for rank, peak in peak_act.items()
    }
    return peak_act, peak_total


def simulate(schedule: Schedule, cost: CostModel) -> SimResult:
    """Run ``schedule`` (lowered here if it is not yet) on the clock with ``cost``."""
    if cost.num_stages != schedule.num_stages:
        raise CostError(
            f"cost model has {cost.num_stages} stages but schedule {schedule.name!r} has "
            f"{schedule.num_stages}; build the costs with the same partition "
            "(pp * virtual_stages stages)"
        )
    lowered = schedule if schedule.lowered else lower(schedule)
    transfer = cost.transfer_time()

    def duration(rank: int, a: Action) -> float:
        return cost.action_duration(a) if a.kind.is_compute else 0.0

    run = execute(lowered, duration, lambda a: transfer)
    peak_act, peak_total = peak_memory(lowered, cost)
    return SimResult(lowered, cost, run, peak_act, peak_total)
