"""Connecting a pipeline's ranks: the point-to-point groups a lowered schedule uses.

Shared by training (:class:`~conveyor.runtime.pipeline.Pipeline`) and generation
(:mod:`conveyor.runtime.generate`), so both talk over the same kind of groups and
the same transport, NCCL-semantics emulation included.
"""

from __future__ import annotations

import os

import torch

from ..parallel.mesh import Mesh
from ..schedules import Kind, Schedule
from .comm import P2P, link_of
from .nccl_semantics import NcclSemantics
from .transport import TorchTransport

__all__ = ["NCCL_SEMANTICS_ENV", "connect", "nccl_semantics_requested"]

NCCL_SEMANTICS_ENV = "CONVEYOR_NCCL_SEMANTICS"
"""Set to 1 to run point-to-point traffic under NCCL's rules on gloo (a test mode)."""


def nccl_semantics_requested(flag: bool | None) -> bool:
    """``flag`` if given, else whether the environment asks for NCCL semantics."""
    if flag is not None:
        return flag
    return os.environ.get(NCCL_SEMANTICS_ENV, "0") not in ("", "0")


def connect(
    mesh: Mesh, lowered: Schedule, device: torch.device, timeout_s: float, emulate: bool
) -> P2P:
    """Point-to-point groups for every link ``lowered`` uses, warmed up (collective call)."""
    placement = lowered.placement
    stage_pp = [placement.rank_of(s) for s in range(placement.num_stages)]
    links = [link_of(a, stage_pp) for acts in lowered.actions.values() for a in acts
             if a.kind in (Kind.SEND_F, Kind.SEND_B)]
    groups = mesh.link_groups(links)  # collective: every rank, the same links
    if emulate and device.type != "cpu":
        raise ValueError("NCCL semantics are emulated on the CPU (gloo); use device='cpu'")
    key = ("transport", emulate)
    if key not in mesh.cache:
        mesh.cache[key] = NcclSemantics(timeout_s) if emulate else TorchTransport(device, timeout_s)
    transport = mesh.cache[key]
    me = mesh.rank
    mine = {k: g for k, g in groups.items() if me in k[:2]}
    for link in sorted(mine):  # one global order: no two ranks wait on each other
        transport.warm_up(mine[link])
    stage_ranks = [mesh.pp_ranks[r] for r in stage_pp]
    health = mesh.cache.setdefault(("p2p-health", emulate), {})
    return P2P(mine, stage_ranks, transport, device, timeout_s, health)
