"""``Pipeline`` as a library: bad batches, accumulation across calls, failed steps.

All cases run in one spawned 2-rank group (pp=2); the single-process model is the
reference, as in the equivalence tests.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import cache
from unittest import mock

import pytest
import torch

from conveyor.models import Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.executor import PipelineError
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import BatchError, Pipeline
from conveyor.runtime.stage import StageRunner
from equivalence import Case, batches, family_batches, rel_diff

pytestmark = pytest.mark.multiprocess

ACCUMULATE = [Case("1f1b", 2, 2, tied=True), Case("zb-h1", 2, 4, tied=True, flavour="llama")]
# ZB-H2 at pp=2, m=4 ends with weight-grads only: rank 0 ... 0RECV_B3 0B3 0W3,
# rank 1 ... 1SEND_B3 1W1 1W2 1W3. Failing at 0W3 and 1W1 leaves partial grads,
# losses and two deferred weight-grads behind, with no message in flight.
FAIL = Case("zb-h2", 2, 4, tied=True)
FAIL_AT = {0: (0, 3), 1: (1, 1)}  # rank -> (stage, microbatch) of the W that raises


def _grads(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _bad_batches(mesh: Mesh) -> list[str]:
    pipe = Pipeline(Case("1f1b", 2, 4).model, Case("1f1b", 2, 4).parallel, mesh, seed=0)
    x, y = batches()[0]
    out = []
    for tokens, targets in [(x[:6], y[:6]), (x, y[:, :-1]), (x.float(), y), (x[:0], y[:0])]:
        try:
            pipe.train_step(tokens, targets)
            out.append("accepted")
        except BatchError as err:
            out.append(str(err))
    try:
        pipe.eval_step(x[:5], y[:5])
        out.append("accepted")
    except BatchError as err:
        out.append(str(err))
    return out


def _bad_named_batches(mesh: Mesh) -> list[str]:
    """A family's named inputs and targets that do not fit (bert at pp=2, m=4)."""
    case = Case("1f1b", 2, 4, family="bert")
    pipe = Pipeline(case.model, case.parallel, mesh, seed=0)
    x, y = family_batches("bert", 8, case.vocab)[0]
    long = {k: torch.cat([v, v], dim=1) for k, v in x.items()}
    out = []
    for inputs, targets in [({**x, "segments": x["segments"][:4]}, y),
                            ({k: v[:6] for k, v in x.items()}, {k: v[:6] for k, v in y.items()}),
                            (long, y), ({}, y)]:
        try:
            pipe.train_step(inputs, targets)
            out.append("accepted")
        except BatchError as err:
            out.append(str(err))
    return out


def _accumulate(mesh: Mesh) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for case in ACCUMULATE:
        pipe = Pipeline(case.model, case.parallel, mesh, seed=0)
        for x, y in batches()[:2]:  # two calls, no zero_grad between them
            pipe.train_step(x, y)
        out[str(case)] = _grads(pipe)
    return out


def _failed_step(mesh: Mesh) -> dict[str, object]:
    rank = mesh.pp_rank
    fail_stage, fail_mb = FAIL_AT[rank]
    x, y = batches()[0]
    pipe = Pipeline(FAIL.model, FAIL.parallel, mesh, seed=0)
    weight = StageRunner.weight
    calls = {"armed": True}

    def failing_weight(self: StageRunner, mb: int) -> None:
        if calls["armed"] and (self.stage, mb) == (fail_stage, fail_mb):
            calls["armed"] = False
            raise RuntimeError("injected failure")
        weight(self, mb)

    with mock.patch.object(StageRunner, "weight", failing_weight):
        try:
            pipe.train_step(x, y)
            error = "none"
        except PipelineError as err:
            error = str(err).splitlines()[0]
    loss = pipe.train_step(x, y)
    fresh = Pipeline(FAIL.model, FAIL.parallel, mesh, seed=0)
    fresh_loss = fresh.train_step(x, y)
    return {"error": error, "loss": (loss, fresh_loss), "grads": (_grads(pipe), _grads(fresh)),
            "live": pipe.meter.live}


def _failed_in_flight() -> str:
    mesh = Mesh.build(2)  # its own groups: this case leaves stale messages behind
    case = Case("1f1b", 2, 4)
    pipe = Pipeline(case.model, case.parallel, mesh, seed=0, timeout_s=2)
    forward = StageRunner.forward

    def failing_forward(self: StageRunner, mb: int, *args: object, **kw: object) -> object:
        if self.stage == 1:
            raise RuntimeError("injected failure")
        return forward(self, mb, *args, **kw)

    x, y = batches()[0]
    with mock.patch.object(StageRunner, "forward", failing_forward):
        try:
            pipe.train_step(x, y)
        except PipelineError:
            pass
    try:
        pipe.train_step(x, y)
        return "ran"
    except PipelineError as err:
        return str(err)


def _send_peaks(mesh: Mesh) -> dict[str, int]:
    """Most boundary bytes a rank had in flight in 1F1B with 16 microbatches, per mode."""
    case = Case("1f1b", 2, 16)
    x, y = batches(16)[0]
    out = {}
    for emulate in (False, True):
        pipe = Pipeline(case.model, case.parallel, mesh, seed=0, emulate_nccl=emulate)
        for _ in range(2):
            pipe.train_step(x, y)
        out["nccl" if emulate else "gloo"] = pipe.meter.peak_by.get("send", 0)
    return out


def _threads_seen(mesh: Mesh) -> dict[bool, object]:
    """Each F and B's intra-op threads in a 1F1B step at m=4, with and without lending cores."""
    out: dict[bool, object] = {}
    forward, backward = StageRunner.forward, StageRunner.backward
    seen: list[tuple[str, int]] = []

    def recording_forward(self: StageRunner, mb: int, *args: object, **kw: object) -> object:
        seen.append((f"{self.stage}F{mb}", torch.get_num_threads()))
        return forward(self, mb, *args, **kw)

    def recording_backward(self: StageRunner, mb: int, *args: object, **kw: object) -> object:
        seen.append((f"{self.stage}B{mb}", torch.get_num_threads()))
        return backward(self, mb, *args, **kw)

    x, y = batches()[0]
    case = Case("1f1b", 2, 4)
    for lend in (True, False):
        seen.clear()
        pipe = Pipeline(case.model, replace(case.parallel, lend_cores=lend), mesh, seed=0)
        with mock.patch.object(StageRunner, "forward", recording_forward), \
                mock.patch.object(StageRunner, "backward", recording_backward):
            loss = pipe.train_step(x, y)
        out[lend] = {"seen": dict(seen), "after": torch.get_num_threads(), "loss": loss,
                     "grads": _grads(pipe)}
    return out


def _run() -> dict[str, object]:
    mesh = Mesh.build(2)
    return {"threads": _threads_seen(mesh),
            "bad": _bad_batches(mesh), "bad_named": _bad_named_batches(mesh),
            "accumulate": _accumulate(mesh),
            "send_peaks": _send_peaks(mesh),
            "failed": _failed_step(mesh), "in_flight": _failed_in_flight()}


@cache
def _results() -> dict[int, dict[str, object]]:
    return launch(_run, 2, timeout_s=60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="lending needs a core per rank")
def test_idle_cores_are_lent_to_the_actions_that_run_alone() -> None:
    for rank, result in _results().items():
        lent, own = result["threads"][True], result["threads"][False]  # type: ignore[index]
        alone = {"0F0", "0B3"} if rank == 0 else set()  # see test_schedules_concurrency
        assert {a for a, n in lent["seen"].items() if n == 2} == alone
        assert all(n == 1 for a, n in lent["seen"].items() if a not in alone)
        assert set(own["seen"].values()) == {1}, "lend_cores=False keeps every action on its own thread"
        assert lent["after"] == own["after"] == 1
        assert lent["loss"] == pytest.approx(own["loss"], rel=1e-6)
        for name, grad in lent["grads"].items():
            assert rel_diff(grad, own["grads"][name]) <= 1e-5, name


def test_named_batches_that_do_not_fit_are_named_errors() -> None:
    bad = _results()[0]["bad_named"]
    assert "different batch sizes" in bad[0] and "inputs['segments']" in bad[0]
    assert "batch of 6 sequences does not split evenly" in bad[1]
    assert "longer than max_seq_len=16" in bad[2] and "inputs['tokens']" in bad[2]
    assert "inputs are empty" in bad[3]


def test_batches_that_do_not_fit_are_named_errors() -> None:
    bad = _results()[0]["bad"]
    assert "batch of 6 sequences does not split evenly into dp=1 x microbatches=4" in bad[0]
    assert "multiple of 4" in bad[0]
    assert "must both be (batch, sequence) of the same shape" in bad[1]
    assert "int64" in bad[2]
    assert "batch of 0 sequences" in bad[3]
    assert "batch of 5 sequences" in bad[4]


@pytest.mark.parametrize("case", ACCUMULATE, ids=str)
def test_grads_accumulate_across_calls_like_one_process(case: Case) -> None:
    model = Transformer(case.model, seed=0)
    for x, y in batches()[:2]:
        model.loss(x, y).backward()
    ref = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    seen = set()
    for rank, result in _results().items():
        for name, grad in result["accumulate"][str(case)].items():  # type: ignore[index]
            assert rel_diff(grad, ref[name]) <= 1e-5, f"rank {rank} {name}"
            seen.add(name)
    assert seen == set(ref)


def test_a_failed_step_leaves_nothing_behind() -> None:
    for rank, result in _results().items():
        failed = result["failed"]
        assert failed["error"].startswith(f"rank {rank} failed at its action #")  # type: ignore[index]
        assert "injected failure" in failed["error"]  # type: ignore[index]
        loss, fresh_loss = failed["loss"]  # type: ignore[index]
        assert loss == fresh_loss
        grads, fresh = failed["grads"]  # type: ignore[index]
        assert grads.keys() == fresh.keys()
        for name in grads:
            assert torch.equal(grads[name], fresh[name]), f"rank {rank} {name}"
        assert failed["live"] == 0  # type: ignore[index]


def test_a_step_after_a_failure_in_flight_is_refused_by_name() -> None:
    for result in _results().values():
        msg = result["in_flight"]
        assert "failed with communication in flight" in msg, msg  # type: ignore[operator]
        assert "cannot run another step" in msg  # type: ignore[operator]


def test_delivered_sends_are_let_go_during_the_step() -> None:
    # one boundary tensor: 1 sequence x 16 positions x d_model 32, fp32
    one = 1 * 16 * 32 * 4
    for rank, result in _results().items():
        for mode, peak in result["send_peaks"].items():  # type: ignore[union-attr]
            # held to the step's end, the 16 sends would peak at 16 tensors
            assert 0 < peak <= 4 * one, f"rank {rank} {mode}: {peak / one:.0f} tensors in flight"
