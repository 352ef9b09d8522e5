"""The pp x dp x tp process mesh: which ranks a rank talks to, as process groups.

Global rank = ((pp_index * dp) + dp_index) * tp + tp_index: tensor-parallel peers
are neighbours (same host, fastest links), pipeline stages are furthest apart.
Built on ``torch.distributed.device_mesh`` so nobody computes neighbours by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["Mesh"]


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates and process groups in the pp x dp x tp mesh."""

    device_mesh: DeviceMesh
    pp: int
    dp: int
    tp: int
    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    pp_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, by pipeline index."""
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Groups and transports built on this mesh, reused by every pipeline on it."""

    @classmethod
    def build(cls, pp: int, dp: int = 1, tp: int = 1, device_type: str = "cpu") -> Mesh:
        """Create the mesh over the initialised default process group (collective call)."""
        world = dist.get_world_size()
        if pp * dp * tp != world:
            raise ValueError(
                f"pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} ranks, but the world has {world}; "
                "start pp*dp*tp processes"
            )
        dm = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        pp_ranks = tuple(dm["pp"].mesh.tolist())
        return cls(
            device_mesh=dm,
            pp=pp,
            dp=dp,
            tp=tp,
            rank=dist.get_rank(),
            pp_rank=dm.get_local_rank("pp"),
            dp_rank=dm.get_local_rank("dp"),
            tp_rank=dm.get_local_rank("tp"),
            pp_group=dm.get_group("pp"),
            dp_group=dm.get_group("dp"),
            tp_group=dm.get_group("tp"),
            pp_ranks=pp_ranks,
        )

    def link_groups(
        self, links: list[tuple[int, int, str]]
    ) -> dict[tuple[int, int, str], dist.ProcessGroup]:
        """Two-rank groups for directed links ``(src, dst, channel)`` of pipeline indices.

        Collective call, with the same ``links`` on every rank: a link's groups are
        created for every pipeline (one per dp x tp position), once per mesh and
        channel. Returns this rank's pipeline's groups, keyed by *global* ranks.
        """
        full = self.device_mesh.mesh  # (pp, dp, tp) tensor of global ranks
        cached: dict[tuple[int, int, str], dist.ProcessGroup] = self.cache.setdefault("links", {})
        mine: dict[tuple[int, int, str], dist.ProcessGroup] = {}
        d, t = self.dp_rank, self.tp_rank
        for link in sorted(set(links)):
            src, dst, channel = link
            if link not in cached:  # the same on every rank: links arrive in the same order
                for dd in range(self.dp):
                    for tt in range(self.tp):
                        ranks = sorted({int(full[src, dd, tt]), int(full[dst, dd, tt])})
                        group = dist.new_group(ranks)
                        if (dd, tt) == (d, t):
                            cached[link] = group
            mine[(int(full[src, d, t]), int(full[dst, d, t]), channel)] = cached[link]
        return mine

    def pipeline_pair_group(self, a: int, b: int) -> dist.ProcessGroup | None:
        """A group of pipeline indices ``a`` and ``b`` of this rank's pipeline (collective call).

        Every rank creates the groups of every pipeline, in the same order, as
        ``new_group`` requires; it returns its own, or None if it is in neither.
        """
        mine = None
        full = self.device_mesh.mesh  # (pp, dp, tp) tensor of global ranks
        for d in range(self.dp):
            for t in range(self.tp):
                ranks = sorted({int(full[a, d, t]), int(full[b, d, t])})
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = group
        return mine
