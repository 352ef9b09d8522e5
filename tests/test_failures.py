"""Invariant 3: no hang without a message. A rank whose peer never answers names
the action it waited on and exits non-zero, and its peers are stopped too."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline

pytestmark = pytest.mark.multiprocess

TINY = ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=2, max_seq_len=8)


def _rank0_stalls(stall_rank: int) -> None:
    import torch
    import torch.distributed as dist

    mesh = Mesh.build(2)
    pipe = Pipeline(TINY, ParallelConfig(pp=2, microbatches=2), mesh, timeout_s=2.0)
    x = torch.zeros(4, 8, dtype=torch.long)
    if dist.get_rank() == stall_rank:
        time.sleep(120)  # a stuck peer: never sends its activations
    pipe.train_step(x, x)


def test_stalled_peer_names_action_and_all_ranks_exit() -> None:
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as err:
        launch(_rank0_stalls, 2, 0, timeout_s=30)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    # rank 1 waited for stage 1's input of microbatch 0 from rank 0
    assert "rank 1 failed at its action #0, 1RECV_F0 (stage 1, microbatch 0)" in msg
    assert "[1RECV_F0]" in msg  # the grid marks the failing action
    assert elapsed < 60, f"launch took {elapsed:.0f}s: the stalled rank was not stopped"


def _rank1_is_killed() -> None:
    import os
    import signal

    import torch.distributed as dist

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # rank 0 would wait here: it must be stopped, not waited for


def test_a_killed_rank_is_one_line_and_stops_the_others() -> None:
    from conveyor.runtime.launch import RankDied

    t0 = time.monotonic()
    with pytest.raises(RankDied, match=r"^rank 1 \(pid \d+\) died: signal SIGKILL; the other"):
        launch(_rank1_is_killed, 2, timeout_s=30)
    assert time.monotonic() - t0 < 30
