"""Receive buffers: reused once nothing holds their storage, never while something does."""

from __future__ import annotations

import pytest
import torch

from conveyor.runtime.buffers import RecvBuffers
from equivalence import Case

CPU = torch.device("cpu")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_buffer_is_reused_once_its_alias_is_gone() -> None:
    pool = RecvBuffers()
    a = pool.take((2, 3), torch.float32, CPU)
    ptr = _storage(a)
    del a
    b = pool.take((2, 3), torch.float32, CPU)
    assert _storage(b) == ptr and len(pool) == 1


def test_a_buffer_in_use_is_not_handed_out() -> None:
    pool = RecvBuffers()
    a = pool.take((4,), torch.float32, CPU)
    view = a[1:]
    b = pool.take((4,), torch.float32, CPU)
    assert _storage(b) != _storage(a)  # `a` is still held
    del a
    c = pool.take((4,), torch.float32, CPU)
    assert _storage(c) not in (_storage(view), _storage(b))  # a view keeps it busy too
    assert len(pool) == 3


def test_an_autograd_graph_keeps_its_input_buffer() -> None:
    pool = RecvBuffers()
    x = pool.take((3,), torch.float32, CPU).fill_(1.0).requires_grad_(True)
    ptr = _storage(x)
    out = (x * x).sum()  # saves x for backward
    del x
    assert _storage(pool.take((3,), torch.float32, CPU)) != ptr
    out.backward()
    del out  # the graph is gone: the first buffer is free again
    assert _storage(pool.take((3,), torch.float32, CPU)) == ptr


def test_shapes_and_dtypes_have_their_own_buffers() -> None:
    pool = RecvBuffers()
    a = pool.take((2,), torch.float32, CPU)
    b = pool.take((2,), torch.bfloat16, CPU)
    c = pool.take((3,), torch.float32, CPU)
    assert (a.dtype, b.dtype, tuple(c.shape)) == (torch.float32, torch.bfloat16, (3,))
    assert len(pool) == 3


def _pool_sizes(case: object) -> list[int]:
    from conveyor.parallel.mesh import Mesh
    from conveyor.runtime.pipeline import Pipeline
    from equivalence import batches

    assert isinstance(case, Case)
    pipe = Pipeline(case.model, case.parallel, Mesh.build(case.pp), seed=0, timeout_s=60)
    x, y = batches(case.batch, case.vocab)[0]
    sizes = []
    for _ in range(3):
        pipe.train_step(x, y)
        sizes.append(len(pipe.p2p.buffers))
    return sizes


@pytest.mark.multiprocess
def test_pipeline_steps_after_the_first_allocate_no_receive_buffer() -> None:
    from conveyor.runtime.launch import launch

    # GPipe's last stage holds every microbatch's input until its backward: 4 buffers;
    # the first consumes each grad at once: fewer (one in use, the next prefetched)
    per_rank = launch(_pool_sizes, 2, Case("gpipe", 2, 4), timeout_s=120)
    assert per_rank[1] == [4, 4, 4], per_rank
    assert per_rank[0][0] < 4 and len(set(per_rank[0])) == 1, per_rank
