"""Communication costs measured on this machine: gloo collectives and send/recv between ranks.

``conveyor plan --device cpu --profile`` prices tensor- and data-parallel collectives
with what this module measures instead of the preset's constants. Two ranks (local
processes, one thread each, as the runtime runs them) time, at a few sizes, each
collective the runtime issues (all-reduce, all-gather, reduce-scatter; ``S`` = the
full tensor's bytes) from a barrier to its return, and a send/recv ping-pong (half
a round trip). The slower rank's median per size is fitted with ``t = a + S / B``
(least squares of the relative error, ``a >= 0``) per collective; so is the copying a data-parallel
bucket costs each rank around its all-reduce (``bucket-copy``: the grads
concatenated, averaged, copied back; ``parallel.data``), which no link model has.
:meth:`CommCalibration.ring_ops` turns
each fit into the ring model's per-step latency and bandwidth
(:func:`~conveyor.sim.comm.collective_time`), which reproduces the fit at 2 ranks and
scales it by the ring's steps and bytes on more.

A calibration is cached as JSON (:func:`calibrate` with ``path``), so one
measurement serves many plans; the file's ``collectives`` table can also be put in a
device file. ``sim`` does not import the runtime: the caller hands its launcher in.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conveyor.data.atomic import atomic_write
from conveyor.parallel.collectives import ALL_GATHER, REDUCE_SCATTER

from .cost import CostError
from .profile import Launcher

__all__ = ["CommCalibration", "Fit", "calibrate", "default_path", "fit_line", "ring_ops",
           "time_collectives"]

OPS = ("all-reduce", "all-gather", "reduce-scatter", "send-recv", "bucket-copy")
SIZES = (4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
"""Bytes timed: from a loss scalar's neighbourhood to a small model's gradients."""


@dataclass(frozen=True)
class Fit:
    """``seconds = latency_s + nbytes / bandwidth_Bps`` for one operation on 2 ranks."""

    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: float) -> float:
        """Predicted seconds for ``nbytes``."""
        return self.latency_s + nbytes / self.bandwidth_Bps


def fit_line(points: Sequence[tuple[float, float]]) -> Fit:
    """``t = a + b S`` over (bytes, seconds), least squares of the *relative* error.

    Weighting each point by ``1 / t^2`` lets the small sizes set the latency and the
    large ones the bandwidth: a plain fit lets the few milliseconds of the largest
    messages (and their noise) decide the intercept, which tiny collectives (a loss,
    an SP norm's grad) then pay many times. ``a >= 0`` and ``b > 0``.
    """
    if len(points) < 2:
        raise CostError(f"a fit needs at least 2 sizes, got {len(points)}")
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    ws = [1.0 / max(y, 1e-12) ** 2 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    slope = max(sxy / sxx if sxx else 0.0, 1e-15)
    intercept = my - slope * mx
    if intercept < 0:  # no negative latency: refit through the origin
        intercept = 0.0
        slope = max(sum(w * x * y for w, x, y in zip(ws, xs, ys, strict=True))
                    / sum(w * x * x for w, x in zip(ws, xs, strict=True)), 1e-15)
    return Fit(intercept, 1.0 / slope)


@dataclass(frozen=True)
class CommCalibration:
    """Measured fits per operation (2 ranks), and the raw medians they came from."""

    fits: dict[str, Fit]
    medians: dict[str, list[tuple[int, float]]]
    """Per operation: (bytes, median seconds of the slower rank) for each size timed."""
    source: str = ""

    def seconds(self, op: str, nbytes: float) -> float:
        """Fitted seconds of ``op`` on ``nbytes`` (2 ranks)."""
        return self.fits[op].seconds(nbytes)

    def ring_ops(self) -> tuple[tuple[str, float, float], ...]:
        """(op, per-step latency, bandwidth) for the ring model of ``sim.comm``."""
        return ring_ops(self.fits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``collectives`` (fits) plus the medians."""
        return {"collectives": {op: {"latency_s": f.latency_s, "bandwidth_Bps": f.bandwidth_Bps}
                                for op, f in self.fits.items()},
                "medians": {op: [list(p) for p in pts] for op, pts in self.medians.items()},
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommCalibration:
        """Inverse of :meth:`to_dict`; a missing operation is an error naming it."""
        try:
            fits = {op: Fit(float(v["latency_s"]), float(v["bandwidth_Bps"]))
                    for op, v in d["collectives"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CostError(f"no valid collectives table ({type(err).__name__}: {err}); "
                            "expected {\"collectives\": {op: {latency_s, bandwidth_Bps}}}"
                            ) from None
        missing = [op for op in OPS if op not in fits]
        if missing:
            raise CostError(f"no fit for {', '.join(missing)}")
        medians = {op: [(int(b), float(s)) for b, s in pts]
                   for op, pts in d.get("medians", {}).items()}
        return cls(fits, medians, str(d.get("source", "")))


def ring_ops(fits: Mapping[str, Fit]) -> tuple[tuple[str, float, float], ...]:
    """2-rank fits of the collectives as (op, per-step latency, bandwidth) of a ring.

    At 2 ranks a ring all-reduce is 2 steps of half the tensor, an all-gather or
    reduce-scatter 1 step of half (``S / n / bw`` per step): so latency = a / steps,
    and bandwidth = B for the all-reduce, B / 2 for the others.
    """
    out = []
    for op in ("all-reduce", "all-gather", "reduce-scatter"):
        if op in fits:
            fit = fits[op]
            steps = 2 if op == "all-reduce" else 1
            out.append((op, fit.latency_s / steps,
                        fit.bandwidth_Bps if steps == 2 else fit.bandwidth_Bps / 2))
    return tuple(out)


def _call(op: str, full: torch.Tensor, shard: torch.Tensor, rank: int, peer: int | None
          ) -> Callable[[], None]:
    """One timed call of ``op``: ``full`` is the whole tensor, ``shard`` one rank's part."""
    if op == "all-reduce":
        return lambda: dist.all_reduce(full)
    if op == "all-gather":
        return lambda: ALL_GATHER(full, shard)
    if op == "reduce-scatter":
        return lambda: REDUCE_SCATTER(shard, full)
    if op == "bucket-copy":  # a dp bucket's grads flattened, averaged and copied back
        grads = list(full.chunk(16))
        return lambda: [g.clone() for g in torch.cat(grads).div_(2).split(
            [g.numel() for g in grads])] and None

    def ping_pong() -> None:  # half a round trip is one message
        if peer is None:
            return
        if rank == 0:
            dist.send(full, peer)
            dist.recv(full, peer)
        elif rank == 1:
            dist.recv(full, peer)
            dist.send(full, peer)
    return ping_pong


def time_collectives(sizes: Sequence[int] = SIZES, repeats: int = 15, warmup: int = 3
                     ) -> dict[str, list[tuple[int, float]]]:
    """In every rank of an initialised group: this rank's median seconds per (op, size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    clock = time.perf_counter
    out: dict[str, list[tuple[int, float]]] = {op: [] for op in OPS}
    peer = 1 - rank if world == 2 else None
    for size in sizes:
        n = max(size // 4, world)
        n -= n % world
        full, shard = torch.randn(n), torch.randn(n // world)
        for op in OPS:
            fn = _call(op, full, shard, rank, peer)
            times = []
            for rep in range(warmup + repeats):
                dist.barrier()
                t0 = clock()
                fn()
                if rep >= warmup:
                    times.append(clock() - t0)
            seconds = statistics.median(times)
            out[op].append((n * 4, seconds / 2 if op == "send-recv" else seconds))
    return out


def _measure_rank(sizes: Sequence[int], repeats: int) -> dict[str, list[tuple[int, float]]]:
    torch.set_num_threads(1)
    return time_collectives(sizes, repeats)


def default_path() -> Path:
    """Where ``conveyor plan --profile`` caches its calibration: the user's cache dir."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conveyor" / "gloo-2ranks.json"


def calibrate(path: str | Path | None = None, *, launch: Launcher,
              sizes: Sequence[int] = SIZES, repeats: int = 15,
              refresh: bool = False) -> CommCalibration:
    """Measure gloo on 2 local ranks and fit each operation; cached at ``path`` if given.

    An existing ``path`` is read instead of measuring again, unless ``refresh``.
    ``launch`` starts the ranks (the runtime's, ``conveyor.runtime.profiling``).
    """
    if path is not None and Path(path).is_file() and not refresh:
        try:
            return CommCalibration.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, OSError) as err:
            raise CostError(f"calibration {path} cannot be read ({err}); delete it (or pass "
                            "--recalibrate) to measure again") from None
    got = launch(_measure_rank, 2, tuple(sizes), repeats, backend="gloo", timeout_s=300)
    medians = {op: [(b, max(got[r][op][i][1] for r in got)) for i, (b, _) in
                    enumerate(got[0][op])] for op in OPS}
    cal = CommCalibration({op: fit_line(pts) for op, pts in medians.items()}, medians,
                          f"gloo on 2 local ranks, 1 thread each, median of {repeats}, "
                          f"measured {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if path is not None:
        text = (json.dumps(cal.to_dict(), indent=2) + "\n").encode()
        atomic_write(Path(path), lambda f: f.write(text))  # a killed plan leaves no half file
    return cal
