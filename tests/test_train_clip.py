"""Global grad-norm clipping across stages and tp shards equals torch's clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.models import Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.train.clip import clip_global_grad_norm

pytestmark = pytest.mark.multiprocess

TIED = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=2, max_seq_len=8,
                   tie_embeddings=True)
MAX_NORM = 0.1  # well below the norm, so clipping scales every grad


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, TIED.vocab_size, (8, 9), generator=torch.Generator().manual_seed(7))
    return t[:, :-1], t[:, 1:]


def _pipeline_clip(
    pp: int, dp: int, tp: int
) -> tuple[float, float, dict[str, torch.Tensor], bool]:
    mesh = Mesh.build(pp, dp, tp)
    pipe = Pipeline(TIED, ParallelConfig(pp=pp, dp=dp, tp=tp, microbatches=2), mesh, seed=0,
                    timeout_s=60)
    pipe.train_step(*_batch())
    dup = pipe.tied_duplicate()
    dups = [dup] if dup is not None else []
    params = pipe.parameters()
    groups = {"group": mesh.pp_group, "tp_group": mesh.tp_group}
    counted_twice = clip_global_grad_norm(params, 0.0, **groups)  # measure only
    norm = clip_global_grad_norm(params, MAX_NORM, duplicates=dups, **groups)
    # logical grads: tp shards gathered (a collective, in the same order on every tp rank)
    grads = {n: pipe.to_full(n, p.grad) for n, p in pipe.named_parameters()}
    return norm, counted_twice, grads, dup is not None


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    model = Transformer(TIED, seed=0)
    model.loss(*_batch()).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    # both names of the tied weight, as the pipeline's two stages call it
    return norm, {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize(("pp", "dp", "tp"), [(2, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_global_norm_equals_single_process(pp: int, dp: int, tp: int) -> None:
    ref_norm, ref_grads = _reference()
    results = launch(_pipeline_clip, pp * dp * tp, pp, dp, tp, timeout_s=120)
    assert sorted(results) == list(range(pp * dp * tp))
    head_ranks = [r for r, (_, _, _, has_dup) in results.items() if has_dup]
    assert len(head_ranks) == dp * tp  # the head's copy of the tied weight, per replica and tp rank
    for rank, (norm, counted_twice, grads, _) in results.items():
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"rank {rank}"
        assert counted_twice > norm * (1 + 1e-3), "the tied copy should matter to the norm"
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7,
                                       msg=f"rank {rank} {name}")
