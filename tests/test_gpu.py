"""GPU paths (opt-in, ``-m gpu``): skipped cleanly on machines without CUDA devices.

With one GPU: the single-process pipeline on CUDA (stage runners, executor, local
hand-over between the two stages of ZB-V) matches the model in fp32, and under
bf16 autocast matches the single-process bf16 run. With two: every schedule over
real NCCL matches the single-process model. The NCCL protocol itself is tested on
every machine by the equivalence suite under ``NcclSemantics``.
"""

from __future__ import annotations

import pytest
import torch

from equivalence import Case, assert_equivalent, batches, make_optimizer, reference

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]

needs_one = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices for an NCCL pipeline",
)

PAIR_CASES = [Case(s, 2, 4) for s in ("gpipe", "1f1b", "zb-h1", "zb-h2")] + [
    Case("zb-v", 2, 4, tied=True), Case("interleaved-1f1b", 2, 4, flavour="llama"),
    Case("1f1b", 2, 1), Case("zb-v", 2, 1, flavour="llama"),
]
SINGLE_CASES = [Case("1f1b", 1, 4), Case("zb-v", 1, 4, tied=True, flavour="llama")]
BF16_RTOL = 2e-2  # bf16 keeps ~3 significant digits; microbatching reorders its sums


def _run(cases: list[Case], dtype: torch.dtype | None = None) -> dict:
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", dist.get_rank())
    mesh = Mesh.build(dist.get_world_size(), device_type="cuda")
    out = {}
    for case in cases:
        pipe = Pipeline(case.model, case.parallel, mesh, seed=0, device=device, timeout_s=60,
                        autocast_dtype=dtype)
        opt = make_optimizer(pipe.parameters())
        data = batches(case.batch)
        eval_loss = pipe.eval_step(*data[0])
        losses = []
        for x, y in data:
            opt.zero_grad()
            losses.append(pipe.train_step(x, y))
            opt.step()
        params = {k: v.detach().cpu() for k, v in pipe.named_parameters()}
        peaks = (pipe.meter.peak_units, pipe.stats.peak_activations[pipe.mesh.pp_rank])
        out[str(case)] = (losses, params, eval_loss, peaks)
    return out


def _bf16_reference(case: Case) -> list[float]:
    from conveyor.models import Transformer

    model = Transformer(case.model, seed=0).cuda()
    opt = make_optimizer(list(model.parameters()))
    losses = []
    for x, y in batches(case.batch):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(x.cuda(), y.cuda())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_one
def test_cuda_pipeline_on_one_gpu_matches_single_process() -> None:
    from conveyor.runtime.launch import launch

    got = launch(_run, 1, SINGLE_CASES, backend="nccl", timeout_s=120)
    for case in SINGLE_CASES:
        assert_equivalent(case, {0: got[0][str(case)]}, reference(case))


@needs_one
def test_cuda_bf16_pipeline_matches_single_process_bf16() -> None:
    from conveyor.runtime.launch import launch

    got = launch(_run, 1, SINGLE_CASES, torch.bfloat16, backend="nccl", timeout_s=120)
    for case in SINGLE_CASES:
        ref = _bf16_reference(case)
        for step, (a, b) in enumerate(zip(got[0][str(case)][0], ref, strict=True)):
            assert abs(a - b) <= BF16_RTOL * abs(b), f"{case} step {step}: {a} vs {b}"


@needs_two
def test_nccl_pipeline_matches_single_process() -> None:
    from conveyor.runtime.launch import launch

    per_rank = launch(_run, 2, PAIR_CASES, backend="nccl", timeout_s=120)
    for case in PAIR_CASES:
        got = {r: per_rank[r][str(case)] for r in per_rank}
        assert_equivalent(case, got, reference(case))

