"""Per-stage costs of one pipeline step: durations, memory and the link between stages.

A :class:`CostModel` is plain numbers indexed by stage (not rank: a rank may hold
several stages). It comes from :mod:`conveyor.sim.analytic` (FLOP counts and a
device preset) or :mod:`conveyor.sim.profile` (timing the real blocks), and can be
saved as JSON so that a profile taken once feeds many simulations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from conveyor.schedules import Action, Kind

__all__ = ["CostError", "CostModel"]


class CostError(ValueError):
    """A cost model is malformed or does not fit the schedule it is used with."""


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Seconds and bytes per stage for one microbatch, plus a point-to-point link model."""

    f: tuple[float, ...]
    """Forward seconds of each stage for one microbatch."""
    b: tuple[float, ...]
    """Input-grad seconds of each stage: what an I costs."""
    w: tuple[float, ...]
    """Weight-grad seconds of each stage: what a W costs."""
    activation_bytes: tuple[int, ...]
    """Bytes each stage stashes per microbatch between its F and the action that frees them."""
    param_bytes: tuple[int, ...]
    """Bytes of each stage's parameters."""
    optimizer_bytes: tuple[int, ...]
    """Bytes of each stage's gradients plus optimizer state (Adam in fp32: 3x param bytes)."""
    latency_s: float = 0.0
    """Fixed seconds of one point-to-point message."""
    bandwidth_Bps: float = math.inf
    """Bytes per second of the link between stages (inf: transfers take latency only)."""
    message_bytes: int = 0
    """Bytes of one message: one microbatch's activation (or its grad) between stages."""
    full_b: tuple[float, ...] | None = None
    """Seconds of a full backward of each stage: what a B costs; None: ``b + w``.
    Measured separately because splitting a backward costs some extra."""
    send_overhead_s: float = 0.0
    """Seconds posting one send occupies its rank, right after the producing compute
    (executor work, idle in the timeline; the message leaves when it is posted)."""
    recv_overhead_s: float = 0.0
    """Seconds posting one receive occupies its rank (executor work, idle); the runtime
    posts receives ahead, before the compute action that precedes their consumer."""
    action_overhead_s: float = 0.0
    """Seconds the executor spends between two compute actions besides posting messages
    (bookkeeping, letting delivered sends go)."""
    message_compute_s: float = 0.0
    """Seconds one message takes from the compute of each of its two ranks besides the
    posts (the communication threads copying it, its buffers faulted in): added to the
    receiver's consuming action and to the sender's next compute action, as busy."""
    step_start_s: float = 0.0
    """Extra seconds of each rank's first compute action in a step (cold caches after
    whatever ran between steps)."""
    step_end_s: float = 0.0
    """Seconds a step goes on after the pipeline and the dp reduction: what the runtime
    reduces once per step (tied embedding grads across the pipeline, sequence-parallel
    grads over tp, the loss)."""
    tp_f_s: tuple[float, ...] = ()
    """Of ``f``, the seconds each stage spends in tensor-parallel collectives (() : none)."""
    tp_b_s: tuple[float, ...] = ()
    """Of ``b``, the seconds each stage spends in tensor-parallel collectives (() : none)."""
    dp_reduce_s: tuple[float, ...] = ()
    """Seconds of each stage's data-parallel gradient reduction, in ``dp_buckets`` equal
    buckets started as its last weight-grad action of the step completes them (() : dp=1)."""
    dp_buckets: tuple[int, ...] = ()
    """Buckets of each stage's gradient reduction (() : one each)."""
    dp_after_s: tuple[float, ...] = ()
    """Seconds after the optimizer that nothing overlaps (ZeRO-1's parameter all-gather)."""
    thread_speedup: tuple[float, ...] = ()
    """How much faster a compute action runs on ``k`` ranks' threads than on its own rank's
    (entry ``k - 1``; the first is 1): ``--lend-cores``, where the schedule leaves ranks
    idle (``schedules.concurrency.core_shares``). () : no cores are lent."""
    source: str = field(default="", compare=False)
    """Where the numbers came from, e.g. 'analytic h100' or 'profiled on cpu'."""

    def __post_init__(self) -> None:
        n = len(self.f)
        if n == 0:
            raise CostError("a cost model needs at least one stage; got f=()")
        for name in ("f", "b", "w", "activation_bytes", "param_bytes", "optimizer_bytes"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if len(values) != n:
                raise CostError(
                    f"{name} has {len(values)} entries but f has {n}; give one value per stage"
                )
            for stage, v in enumerate(values):
                if not math.isfinite(v) or v < 0:
                    raise CostError(f"{name}[{stage}] = {v!r}; costs must be finite and >= 0")
        for name in ("tp_f_s", "tp_b_s", "dp_reduce_s", "dp_buckets", "dp_after_s"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if values and (len(values) != n or not all(math.isfinite(v) and v >= 0 for v in values)):
                raise CostError(f"{name}={values!r} needs one finite value >= 0 per stage ({n}), "
                                "or none")
        object.__setattr__(self, "thread_speedup", tuple(self.thread_speedup))
        if self.thread_speedup and (self.thread_speedup[0] != 1.0 or not all(
                math.isfinite(v) and v > 0 for v in self.thread_speedup)):
            raise CostError(f"thread_speedup={self.thread_speedup!r} needs finite values > 0, "
                            "the first 1.0 (one rank's own threads), or none")
        if self.full_b is not None:
            object.__setattr__(self, "full_b", tuple(self.full_b))
            if len(self.full_b) != n or not all(math.isfinite(v) and v >= 0 for v in self.full_b):
                raise CostError(
                    f"full_b={self.full_b!r} needs one finite value >= 0 per stage ({n}), or None"
                )
        for name in ("latency_s", "send_overhead_s", "recv_overhead_s", "action_overhead_s",
                     "message_compute_s", "step_start_s", "step_end_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise CostError(f"{name}={v!r} must be finite and >= 0")
        if not self.bandwidth_Bps > 0:
            raise CostError(f"bandwidth_Bps={self.bandwidth_Bps!r} must be > 0 (inf for free)")
        if self.message_bytes < 0:
            raise CostError(f"message_bytes={self.message_bytes!r} must be >= 0")

    @classmethod
    def uniform(
        cls,
        num_stages: int,
        *,
        f: float = 1.0,
        b: float = 1.0,
        w: float = 0.0,
        activation_bytes: int = 1,
        latency_s: float = 0.0,
    ) -> CostModel:
        """Same costs on every stage: unit costs by default, as the validator uses."""
        return cls(
            f=(f,) * num_stages,
            b=(b,) * num_stages,
            w=(w,) * num_stages,
            activation_bytes=(activation_bytes,) * num_stages,
            param_bytes=(0,) * num_stages,
            optimizer_bytes=(0,) * num_stages,
            latency_s=latency_s,
            source="uniform",
        )

    @property
    def num_stages(self) -> int:
        """Number of stages the model describes."""
        return len(self.f)

    def transfer_time(self) -> float:
        """Seconds for one activation (or grad) message between adjacent stages."""
        return self.latency_s + self.message_bytes / self.bandwidth_Bps

    def duration(self, stage: int, kind: Kind) -> float:
        """Seconds of one single compute action: F, B (full backward, ``full_b`` or b + w), I or W."""
        if kind is Kind.F:
            return self.f[stage]
        if kind is Kind.B:
            return self.full_b[stage] if self.full_b else self.b[stage] + self.w[stage]
        if kind is Kind.I:
            return self.b[stage]
        if kind is Kind.W:
            return self.w[stage]
        if kind is Kind.OVERLAP_F_B:
            raise CostError("an overlapped pair has no stage of its own; use action_duration()")
        raise CostError(f"{kind.value} is communication, not compute; see transfer_time()")

    def action_duration(self, action: Action) -> float:
        """Seconds a compute action occupies its rank; an overlapped pair costs its two parts."""
        # no overlap speed-up is modelled: the pair is as slow as running both in turn
        return sum(self.duration(p.stage, p.kind) for p in action.parts)

    def stage_value(self, name: str, stage: int) -> float:
        """``getattr(self, name)[stage]``, 0 for a per-stage field left empty."""
        values = getattr(self, name)
        return values[stage] if values else 0.0

    def static_bytes(self, stage: int) -> int:
        """Memory a stage holds all step long: parameters, gradients and optimizer state."""
        return self.param_bytes[stage] + self.optimizer_bytes[stage]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinite bandwidth becomes None, as JSON has no inf)."""
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if math.isinf(self.bandwidth_Bps):
            d["bandwidth_Bps"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos are not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CostError(f"unknown cost model keys {unknown}; expected some of {sorted(known)}")
        kw = dict(d)
        if kw.get("bandwidth_Bps", 0) is None:
            kw["bandwidth_Bps"] = math.inf
        for name in ("f", "b", "w", "activation_bytes", "param_bytes", "optimizer_bytes"):
            if name in kw:
                kw[name] = tuple(_seq(kw[name], name))
        for name in ("tp_f_s", "tp_b_s", "dp_reduce_s", "dp_buckets", "dp_after_s"):
            if name in kw:
                kw[name] = tuple(_seq(kw[name], name))
        if kw.get("full_b") is not None:
            kw["full_b"] = tuple(_seq(kw["full_b"], "full_b"))
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a model written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _seq(value: Any, name: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise CostError(f"{name} must be a list with one value per stage; got {value!r}")
    return value
