"""The cluster a plan is for: a device (preset or file) and how many of them, per node."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from conveyor.config import ConfigError
from conveyor.sim import Device, get_device
from conveyor.sim.cost import CostError
from conveyor.sim.gloo import CommCalibration, Fit, ring_ops

__all__ = ["Cluster", "load_device"]

_DEVICE_FIELDS = {f.name for f in dataclasses.fields(Device)}


@dataclass(frozen=True)
class Cluster:
    """``gpus`` devices of one kind, ``gpus_per_node`` to a node (tp innermost in the mesh)."""

    device: Device
    gpus: int

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ConfigError(f"--gpus {self.gpus!r} must be a positive integer")

    @property
    def gpus_per_node(self) -> int:
        """Devices sharing one node's fast link."""
        return self.device.gpus_per_node

    def calibrated(self, cal: CommCalibration) -> Cluster:
        """This cluster with its collectives priced by ``cal`` (measured here), unless the
        device file already gives them."""
        if self.device.collectives:
            return self
        return Cluster(dataclasses.replace(
            self.device, collectives=cal.ring_ops(),
            copy_bandwidth_Bps=cal.fits["bucket-copy"].bandwidth_Bps), self.gpus)

    @classmethod
    def build(cls, device: str, gpus: int, gpus_per_node: int | None = None) -> Cluster:
        """A preset name (cpu, a100, h100) or a TOML/JSON device file; optional node size."""
        dev = load_device(device)
        if gpus_per_node is not None:
            if gpus_per_node < 1:
                raise ConfigError(f"--gpus-per-node {gpus_per_node} must be >= 1")
            dev = dataclasses.replace(dev, gpus_per_node=gpus_per_node)
        return cls(dev, gpus)


def load_device(spec: str) -> Device:
    """A device preset by name, or a file of :class:`~conveyor.sim.Device` fields.

    A file may name a preset to start from (``base = "a100"``) and override any field,
    e.g. ``peak_flops``, ``memory_bytes``, ``link_bandwidth_Bps`` (intra-node),
    ``inter_bandwidth_Bps``, ``gpus_per_node``; ``collectives`` may be a calibration's
    table (``{op: {latency_s, bandwidth_Bps}}`` at 2 ranks, as ``sim.gloo`` writes it).
    """
    path = Path(spec)
    if not path.suffix:
        try:
            return get_device(spec)
        except CostError as err:
            raise ConfigError(f"{err}, or pass a device file (.toml or .json)") from None
    if not path.is_file():
        raise ConfigError(f"--device {spec!r} is neither a preset nor an existing file; "
                          "pass cpu, a100, h100 or a .toml/.json device file")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            raw = tomllib.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ConfigError(f"device file {path} cannot be read ({err}); fix its syntax") from None
    raw = dict(raw.get("device", raw))
    base = raw.pop("base", None)
    if isinstance(raw.get("collectives"), dict):  # a calibration's 2-rank fits, by op
        try:
            fits = {op: Fit(float(v["latency_s"]), float(v["bandwidth_Bps"]))
                    for op, v in raw["collectives"].items()}
            raw["collectives"] = ring_ops(fits)
            if "bucket-copy" in fits:
                raw.setdefault("copy_bandwidth_Bps", fits["bucket-copy"].bandwidth_Bps)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"device file {path}: collectives need {{op: {{latency_s, "
                              f"bandwidth_Bps}}}} ({err!r})") from None
    unknown = sorted(set(raw) - _DEVICE_FIELDS)
    if unknown:
        raise ConfigError(f"device file {path}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(_DEVICE_FIELDS))}")
    try:
        if base is not None:
            return dataclasses.replace(load_device(str(base)), **raw)
        missing = sorted(f for f in ("name", "peak_flops", "efficiency", "memory_bytes",
                                     "link_bandwidth_Bps", "link_latency_s") if f not in raw)
        if missing:
            raise ConfigError(f"device file {path} lacks {', '.join(missing)}; give them or "
                              "start from a preset with base = \"a100\"")
        return Device(**raw)
    except (CostError, TypeError) as err:
        raise ConfigError(f"device file {path}: {err}") from None
