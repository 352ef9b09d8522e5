"""Bucketed data-parallel grad reduction (bucket plans, one all-reduce per bucket, issued
during the step, accumulation across calls like one process) and ZeRO-1 (grads
reduce-scattered, never all-reduced; AdamW on dp chunks equals AdamW on the whole;
checkpoints hold the logical state)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conveyor.config import ConfigError, ParallelConfig
from conveyor.models import Transformer
from conveyor.parallel.data import MIB, plan_buckets
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.zero import chunk_size
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.train.clip import clip_global_grad_norm
from conveyor.train.optim import STATE_KEYS, build_optimizer
from conveyor.train.state import state_tensors
from equivalence import Case, batches, rel_diff

BUCKETED = Case("1f1b", 1, 2, dp=2, tied=True, bucket_mb=0.01)
ZERO = dataclasses.replace(BUCKETED, zero=1)
# torch 2.13 renamed reduce_scatter_tensor; the older name stays, deprecated
REDUCE_SCATTER = ("reduce_scatter_single" if hasattr(dist, "reduce_scatter_single")
                  else "reduce_scatter_tensor")


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


@contextmanager
def _counting(group: object) -> Iterator[list[tuple[str, bool, int]]]:
    """(collective, async_op, elements) of every all-reduce, reduce-scatter and all-gather
    over ``group`` while the block runs."""
    calls: list[tuple[str, bool, int]] = []
    real = {n: getattr(dist, n) for n in ("all_reduce", REDUCE_SCATTER, "all_gather")}

    def wrap(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def counted(tensor: object, *args: object, **kw: object) -> object:
            if kw.get("group") is group:
                numel = tensor.numel() if isinstance(tensor, torch.Tensor) else -1
                label = "reduce_scatter" if name == REDUCE_SCATTER else name
                calls.append((label, bool(kw.get("async_op", False)), numel))
            return fn(tensor, *args, **kw)
        return counted

    for name, fn in real.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _count() -> dict[str, object]:
    mesh = Mesh.build(1, 2)
    pipe = Pipeline(BUCKETED.model, BUCKETED.parallel, mesh, seed=0)
    assert pipe.grad_buckets is not None
    issued_in_step: list[int] = []
    hook = pipe.executor.after_stage_done
    assert hook is not None
    with _counting(mesh.dp_group) as calls:
        def done(stage: int) -> None:  # the stage's last B has ended
            issued_in_step.append(stage)
            calls.append(("stage done", False, 0))
            hook(stage)

        pipe.executor.after_stage_done = done
        for x, y in batches()[:2]:  # two calls, no zero_grad between them
            pipe.train_step(x, y)
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
    return {"calls": [(name, a) for name, a, _ in calls], "buckets": pipe.grad_buckets.num_buckets,
            "issued": issued_in_step, "grads": grads}


def _count_zero() -> dict[str, object]:
    """The dp collectives of one ZeRO-1 step, bucketed, and the chunk grads it leaves."""
    mesh = Mesh.build(1, 2)
    pipe = Pipeline(ZERO.model, ZERO.parallel, mesh, seed=0)
    assert pipe.zero is not None and pipe.grad_buckets is not None
    opt = torch.optim.SGD(pipe.zero.leaves(), lr=0.1)
    x, y = batches()[0]
    with _counting(mesh.dp_group) as calls:
        pipe.train_step(x, y)
        chunks = {n: p.grad.clone() for n, p in pipe.zero.named_shards() if p.grad is not None}
        whole = [n for n, p in pipe.named_parameters() if p.grad is not None]
        pipe.zero.step(opt)
    norm = clip_global_grad_norm(pipe.zero.leaves(), 0.0, dp_group=mesh.dp_group)
    return {"calls": calls, "buckets": pipe.grad_buckets.num_buckets, "chunks": chunks,
            "whole": whole, "rank": mesh.dp_rank, "norm": norm}


def _adamw(zero: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters and checkpoint tensors after 3 AdamW steps at pp=1 x dp=2, with or without ZeRO-1."""
    mesh = Mesh.build(1, 2)
    case = ZERO if zero else BUCKETED
    pipe = Pipeline(case.model, case.parallel, mesh, seed=0)
    shards = pipe.zero
    assert (shards is not None) == zero
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
    return {**_count(), "plain": _adamw(False), "zero": _adamw(True), "zero_step": _count_zero()}


@cache
def _results() -> dict[int, dict[str, object]]:
    return launch(_count_and_zero, 2, timeout_s=120)


@pytest.mark.multiprocess
def test_one_async_all_reduce_per_bucket_issued_inside_the_last_backward() -> None:
    for rank, r in _results().items():
        buckets = r["buckets"]
        assert isinstance(buckets, int) and buckets > 2, f"rank {rank}: want several buckets"
        # two steps; everything is bucketed (the tie is on this rank, one parameter); every
        # bucket goes out while the stage's last B still runs, before the executor reports
        # it done; the one blocking all-reduce per step is the loss's
        step = [("all_reduce", True)] * buckets + [("stage done", False), ("all_reduce", False)]
        assert r["calls"] == step * 2, f"rank {rank}"
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


@pytest.mark.multiprocess
def test_zero1_reduce_scatters_grads_in_buckets_and_never_all_reduces_them() -> None:
    model = Transformer(ZERO.model, seed=0)
    model.loss(*batches()[0]).backward()
    ref = {n: p.grad.reshape(-1) for n, p in model.named_parameters()}
    for rank, r in _results().items():
        z = r["zero_step"]
        assert isinstance(z, dict)
        buckets = z["buckets"]
        # one async reduce-scatter per bucket, issued during the step; the only all-reduce
        # is the loss's scalar; one all-gather of the updated chunks after the step
        assert [c[:2] for c in z["calls"][:buckets]] == [("reduce_scatter", True)] * buckets, \
            f"rank {rank}"
        assert [c[:2] for c in z["calls"][buckets:]] == [("all_reduce", False),
                                                          ("all_gather", False)], f"rank {rank}"
        assert z["calls"][buckets][2] == 1, f"rank {rank}: all-reduced more than the loss"
        assert z["whole"] == [], f"rank {rank}: whole grads kept after the reduce-scatter"
        # each rank holds the averaged grad's chunk it owns, and only that
        for name, g in z["chunks"].items():
            full = ref[name]
            chunk = chunk_size(full.numel(), 2)
            mine = full[z["rank"] * chunk:(z["rank"] + 1) * chunk]
            assert g.shape == mine.shape and rel_diff(g, mine) <= 1e-5, f"rank {rank} {name}"
        assert set(z["chunks"]) == set(ref), f"rank {rank}"
        # the global grad norm sums the chunks' squares over dp: the whole grads' norm
        want = torch.cat(list(ref.values())).norm().item()
        assert z["norm"] == pytest.approx(want, rel=1e-5), f"rank {rank}"
