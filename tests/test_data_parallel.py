"""Bucketed data-parallel grad reduction (bucket plans, one all-reduce per bucket, issued
during the step, accumulation across calls like one process) and ZeRO-1 (AdamW on dp
chunks equals AdamW on the whole; checkpoints hold the logical state)."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conveyor.config import ConfigError, ParallelConfig
from conveyor.models import Transformer
from conveyor.parallel.data import MIB, plan_buckets
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.zero import ZeroShards
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.train.optim import STATE_KEYS, build_optimizer
from conveyor.train.state import state_tensors
from equivalence import Case, batches, rel_diff

BUCKETED = Case("1f1b", 1, 2, dp=2, tied=True, bucket_mb=0.01)


def _param(n: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n, dtype=dtype))


def test_buckets_fill_up_to_the_cap_in_order() -> None:
    ps = [_param(10), _param(10), _param(10), _param(100), _param(5)]
    got = plan_buckets(ps, cap_bytes=80)  # two 40-byte params fit, the 400-byte one alone
    assert [[id(p) for p in b] for b in got] == [[id(ps[0]), id(ps[1])], [id(ps[2])],
                                                  [id(ps[3])], [id(ps[4])]]


def test_a_dtype_change_starts_a_new_bucket() -> None:
    ps = [_param(4), _param(4, torch.bfloat16), _param(4, torch.bfloat16)]
    assert [len(b) for b in plan_buckets(ps, cap_bytes=MIB)] == [1, 2]


def test_a_negative_bucket_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dp_bucket_mb"):
        ParallelConfig(dp=2, dp_bucket_mb=-1)


def _count() -> dict[str, object]:
    mesh = Mesh.build(1, 2)
    pipe = Pipeline(BUCKETED.model, BUCKETED.parallel, mesh, seed=0)
    assert pipe.grad_buckets is not None
    calls: list[bool] = []  # async_op of every all-reduce over the dp group
    real = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: object, **kw: object) -> object:
        if kw.get("group") is mesh.dp_group:
            calls.append(bool(kw.get("async_op", False)))
        return real(tensor, *args, **kw)  # type: ignore[arg-type]

    issued_in_step: list[int] = []
    hook = pipe.executor.after_stage_done
    assert hook is not None
    pipe.executor.after_stage_done = lambda s: (issued_in_step.append(s), hook(s))[-1]
    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        for x, y in batches()[:2]:  # two calls, no zero_grad between them
            pipe.train_step(x, y)
    finally:
        dist.all_reduce = real  # type: ignore[assignment]
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
    return {"calls": calls, "buckets": pipe.grad_buckets.num_buckets,
            "issued": issued_in_step, "grads": grads}


def _adamw(zero: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters and checkpoint tensors after 3 AdamW steps at pp=1 x dp=2, with or without ZeRO-1."""
    mesh = Mesh.build(1, 2)
    pipe = Pipeline(BUCKETED.model, BUCKETED.parallel, mesh, seed=0)
    shards = ZeroShards(pipe.named_parameters(), mesh.dp_group, 2, mesh.dp_rank) if zero else None
    named = pipe.named_parameters() if shards is None else shards.named_shards()
    opt = build_optimizer(named, lr=1e-2, weight_decay=0.1,
                          ndims=None if shards is None else shards.ndims())
    for x, y in batches():
        pipe.zero_grad()
        pipe.train_step(x, y)
        opt.step() if shards is None else shards.step(opt)
    params = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    saved = state_tensors(pipe, opt, shards)
    if shards is not None:  # a load gives back the same logical state
        again = build_optimizer(shards.named_shards(), lr=1e-2, weight_decay=0.1,
                                ndims=shards.ndims())
        shards.load_state(again, shards.full_state(opt, STATE_KEYS))
        for _, leaf in shards.named_shards():
            for key in STATE_KEYS:
                assert torch.equal(opt.state[leaf][key], again.state[leaf][key])
    return params, saved


def _count_and_zero() -> dict[str, object]:
    return {**_count(), "plain": _adamw(False), "zero": _adamw(True)}


@cache
def _results() -> dict[int, dict[str, object]]:
    return launch(_count_and_zero, 2, timeout_s=120)


@pytest.mark.multiprocess
def test_one_async_all_reduce_per_bucket_issued_during_the_step() -> None:
    for rank, r in _results().items():
        buckets = r["buckets"]
        assert isinstance(buckets, int) and buckets > 2, f"rank {rank}: want several buckets"
        # two steps; everything is bucketed (the tie is on this rank, one parameter);
        # the one blocking all-reduce per step is the loss's
        assert r["calls"] == ([True] * buckets + [False]) * 2, f"rank {rank}"
        assert r["issued"] == [0, 0], f"rank {rank}: the stage went out from the executor"


@pytest.mark.multiprocess
def test_bucketed_grads_accumulate_across_calls_like_one_process() -> None:
    model = Transformer(BUCKETED.model, seed=0)
    for x, y in batches()[:2]:
        model.loss(x, y).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    for rank, r in _results().items():
        grads = r["grads"]
        assert isinstance(grads, dict) and set(grads) == set(ref), f"rank {rank}"
        for name, g in grads.items():
            assert rel_diff(g, ref[name]) <= 1e-5, f"rank {rank} {name}"


@pytest.mark.multiprocess
def test_zero1_adamw_matches_unsharded_and_saves_the_logical_state() -> None:
    for rank, r in _results().items():
        (plain_params, plain_saved), (zero_params, zero_saved) = r["plain"], r["zero"]  # type: ignore[misc]
        assert set(plain_saved) == set(zero_saved) and any(k.startswith("optim.") for k in zero_saved)
        for name, t in plain_params.items():
            assert rel_diff(zero_params[name], t) <= 1e-6, f"rank {rank} {name}"
        for key, t in plain_saved.items():
            assert zero_saved[key].shape == t.shape, f"rank {rank} {key}"
            assert rel_diff(zero_saved[key].float(), t.float()) <= 1e-6, f"rank {rank} {key}"
