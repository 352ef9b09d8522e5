"""GPU/NCCL path (opt-in): skipped cleanly on machines without at least two CUDA devices.

NCCL matches point-to-point messages by order, not tag, so this is the check that
the executor's batched gaps mirror each other on both sides of every link.
"""

from __future__ import annotations

import pytest
import torch

from equivalence import Case, assert_equivalent, batches, make_optimizer, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs 2 CUDA devices for an NCCL pipeline",
    ),
]

CASES = [Case("1f1b", 2, 4), Case("zb-h1", 2, 4), Case("zb-v", 2, 4, tied=True),
         Case("interleaved-1f1b", 2, 4, flavour="llama")]


def _run(cases: list[Case]) -> dict:
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline

    device = torch.device("cuda", dist.get_rank())
    mesh = Mesh.build(2, device_type="cuda")
    out = {}
    for case in cases:
        pipe = Pipeline(case.model, case.parallel, mesh, seed=0, device=device, timeout_s=60)
        opt = make_optimizer(pipe.parameters())
        losses = []
        for x, y in batches():
            opt.zero_grad()
            losses.append(pipe.train_step(x, y))
            opt.step()
        out[str(case)] = (losses, {k: v.detach().cpu() for k, v in pipe.named_parameters()})
    return out


def test_nccl_pipeline_matches_single_process() -> None:
    from conveyor.runtime.launch import launch

    torch.backends.cuda.matmul.allow_tf32 = False
    per_rank = launch(_run, 2, CASES, backend="nccl", timeout_s=120)
    for case in CASES:
        got = {r: per_rank[r][str(case)] for r in per_rank}
        assert_equivalent(case, got, reference(case))
