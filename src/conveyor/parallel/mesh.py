"""The pp x dp x tp process mesh: which ranks a rank talks to, as process groups.

Global rank = ((pp_index * dp) + dp_index) * tp + tp_index: tensor-parallel peers
are neighbours (same host, fastest links), pipeline stages are furthest apart.
Built on ``torch.distributed.device_mesh`` so nobody computes neighbours by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    pp_grad_group: dist.ProcessGroup
    """The same ranks as ``pp_group``, for gradients: NCCL matches messages by order, so
    activations and gradients must not share a group (see runtime/comm.py)."""

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
        grad_group = None
        for d in range(dp):  # new_group is collective: every rank creates every pipeline's
            for t in range(tp):
                ranks = dm.mesh[:, d, t].tolist()
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    grad_group = group
        assert grad_group is not None
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
            pp_grad_group=grad_group,
        )

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
