"""The NCCL-semantics transport is strict where NCCL is: each rule, and the old protocol.

Every check runs twice in one 2-rank gloo group: through ``TorchTransport`` (plain
gloo) and through ``NcclSemantics``. Where plain gloo is forgiving (one work per op,
tag matching, no stream order, any first use), the test shows that it passes and
the emulation refuses; where gloo already behaves like NCCL (its sends wait for the
receiver's "ready" notice), the test pins that the emulation keeps the rule.
"""

from __future__ import annotations

import datetime
import time
from functools import cache
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from conveyor.parallel.mesh import Mesh
from conveyor.runtime.executor import PipelineError
from conveyor.runtime.launch import launch
from conveyor.runtime.nccl_semantics import NcclSemantics
from conveyor.runtime.pipeline import Pipeline
from conveyor.runtime.transport import TorchTransport
from equivalence import Case, batches

pytestmark = pytest.mark.multiprocess

OLD = Case("1f1b", 2, 4)

TIMEOUT_S = 2.0


def _transport(kind: str) -> TorchTransport | NcclSemantics:
    return NcclSemantics(TIMEOUT_S) if kind == "nccl" else TorchTransport(torch.device("cpu"))


def _group(transport: TorchTransport | NcclSemantics) -> dist.ProcessGroup:
    group = dist.new_group([0, 1])
    transport.warm_up(group)
    return group


def _outcome(fn) -> str:  # noqa: ANN001 - a small test closure
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the outcome is what is compared
        return f"error: {err}"


def _works_per_batch(kind: str) -> str:
    t = _transport(kind)
    g = _group(t)
    me, peer = dist.get_rank(), 1 - dist.get_rank()
    a, b = torch.ones(3) * me, torch.empty(3)
    ops = [dist.P2POp(dist.isend, a, peer, g, 0), dist.P2POp(dist.irecv, b, peer, g, 0)]
    works = t.batch(ops)
    for w in works:
        w.wait()
    return f"{len(works)} works, got {b.tolist()}"


def _rendezvous(kind: str) -> str:
    # rank 1 posts its receive a second late: only a rendezvous send is still pending
    t = _transport(kind)
    g = _group(t)
    if dist.get_rank() == 0:
        (w,) = t.batch([dist.P2POp(dist.isend, torch.ones(4), 1, g, 7)])
        time.sleep(0.5)
        early = w.is_completed()
        w.wait()
        return f"complete before the receive: {early}"
    time.sleep(1.0)
    buf = torch.empty(4)
    for w in t.batch([dist.P2POp(dist.irecv, buf, 0, g, 7)]):
        w.wait()
    return "received"


def _ordered(kind: str) -> str:
    # two sends, received in the other order by tag: gloo matches tags, NCCL order
    t = _transport(kind)
    g = _group(t)
    if dist.get_rank() == 0:
        works = t.batch([dist.P2POp(dist.isend, torch.full((2,), 1.0), 1, g, 1)])
        works += t.batch([dist.P2POp(dist.isend, torch.full((2,), 2.0), 1, g, 2)])
        return _outcome(lambda: [w.wait() for w in works] and "sent")
    second, first = torch.empty(2), torch.empty(2)
    works = t.batch([dist.P2POp(dist.irecv, second, 0, g, 2)])
    works += t.batch([dist.P2POp(dist.irecv, first, 0, g, 1)])
    return _outcome(lambda: [w.wait() for w in works] and f"tag 2 got {second.tolist()}")


def _stream_order(kind: str) -> str:
    # each rank queues a receive, then the send the peer's receive needs: one stream
    # per group makes the send wait behind the receive on both sides
    t = _transport(kind)
    g = _group(t)
    peer = 1 - dist.get_rank()
    buf = torch.empty(2)
    works = t.batch([dist.P2POp(dist.irecv, buf, peer, g, 3)])
    works += t.batch([dist.P2POp(dist.isend, torch.ones(2), peer, g, 3)])

    def wait() -> str:
        for w in works:
            if w.wait(datetime.timedelta(seconds=TIMEOUT_S)) is False:
                return "timed out"
        return "done"

    return _outcome(wait)


def _first_use(kind: str) -> str:
    t = _transport(kind)
    g = dist.new_group([0, 1])  # not warmed up
    peer = 1 - dist.get_rank()
    out = torch.empty(1)
    return _outcome(lambda: [w.wait() for w in t.batch(
        [dist.P2POp(dist.isend, torch.ones(1), peer, g, 0),
         dist.P2POp(dist.irecv, out, peer, g, 0)])] and "ran")


def _old_layout(kind: str) -> str:
    """1F1B over ONE group per pipeline, as before links had groups of their own.

    Receives are posted ahead, so a receive can sit in the stream in front of the
    send the peer waits for; gloo's tags hide that, NCCL's stream order does not.
    """
    mesh = Mesh.build(2)

    def shared(self: Mesh, links: list) -> dict:
        return {(self.pp_ranks[a], self.pp_ranks[b], c): self.pp_group for a, b, c in links}

    with mock.patch.object(Mesh, "link_groups", shared):
        pipe = Pipeline(OLD.model, OLD.parallel, mesh, seed=0, timeout_s=TIMEOUT_S,
                        emulate_nccl=kind == "nccl")
    try:
        return " ".join(f"{pipe.train_step(x, y):.6f}" for x, y in batches())
    except PipelineError as err:
        return f"error: {err}"


CHECKS = {"works": _works_per_batch, "rendezvous": _rendezvous, "ordered": _ordered,
          "stream": _stream_order, "first_use": _first_use, "old_layout": _old_layout}


def _run_checks() -> dict[str, str]:
    torch.set_num_threads(1)
    out = {}
    # the emulation's failures (timeouts) leave its streams broken: plain gloo goes first
    for kind in ("gloo", "nccl"):
        for name, fn in CHECKS.items():
            out[f"{name}/{kind}"] = fn(kind)
    return out


@cache
def _results() -> dict[int, dict[str, str]]:
    return launch(_run_checks, 2, timeout_s=60)


def test_one_work_per_batch() -> None:
    r = _results()
    assert r[0]["works/gloo"] == "2 works, got [1.0, 1.0, 1.0]"
    assert r[0]["works/nccl"] == "1 works, got [1.0, 1.0, 1.0]"


def test_sends_complete_only_once_received() -> None:
    r = _results()
    assert r[0]["rendezvous/gloo"] == "complete before the receive: False"
    assert r[0]["rendezvous/nccl"] == "complete before the receive: False"


def test_messages_match_by_order_not_tag() -> None:
    r = _results()
    assert r[1]["ordered/gloo"] == "tag 2 got [2.0, 2.0]"
    assert "ordered matching paired this receive (tag 2" in r[1]["ordered/nccl"]
    assert "tagged 1" in r[1]["ordered/nccl"]


def test_a_send_queued_behind_a_receive_waits_for_it() -> None:
    r = _results()
    assert r[0]["stream/gloo"] == r[1]["stream/gloo"] == "done"
    assert r[0]["stream/nccl"] == r[1]["stream/nccl"] == "timed out"


def test_first_use_of_a_group_must_be_collective() -> None:
    r = _results()
    assert r[0]["first_use/gloo"] == "ran"
    assert "first use of a process group" in r[0]["first_use/nccl"]


def test_the_old_single_group_layout_deadlocks_only_under_nccl_semantics() -> None:
    r = _results()
    # without gradient steps the losses are those of the same weights on each batch
    assert r[0]["old_layout/gloo"] == r[1]["old_layout/gloo"]
    assert not r[0]["old_layout/gloo"].startswith("error")
    errors = [r[rank]["old_layout/nccl"] for rank in (0, 1)]
    for err in errors:
        assert err.startswith("error: rank"), err
        assert "receiving" in err  # names the receive it waited on
    # the first rank to time out tears gloo's connections down, so its peer may see
    # "connection closed" instead of a timeout of its own
    assert any("timed out" in err.lower() for err in errors), errors
