"""When idle ranks' cores may be lent (``runtime.lending``), without spawning anything."""

from __future__ import annotations

import pytest
import torch

from conveyor.runtime.lending import cannot_lend, lent_threads
from conveyor.schedules import build_schedule
from conveyor.threads import available_cores


@pytest.fixture
def one_thread() -> object:
    own = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(own)


def test_a_local_cpu_job_lends_the_schedules_shares(one_thread: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    schedule = build_schedule("1f1b", 2, 4)
    assert cannot_lend(torch.device("cpu"), 1) is None
    assert {str(a): n for a, n in lent_threads(schedule, 0, torch.device("cpu"), 1).items()} == {
        "0F0": 2, "0B3": 2}
    assert lent_threads(schedule, 1, torch.device("cpu"), 1) == {}


def test_no_lending_on_gpus_compiled_across_machines_or_oversubscribed(
        one_thread: object, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = build_schedule("1f1b", 2, 4)
    assert "not on CPU threads" in cannot_lend(torch.device("cuda"), 2)
    assert lent_threads(schedule, 0, torch.device("cuda"), 2) == {}
    assert "--compile builds each CPU kernel" in cannot_lend(torch.device("cpu"), 1, compiled=True)
    assert lent_threads(schedule, 0, torch.device("cpu"), 1, compiled=True) == {}
    many = available_cores() + 1
    assert f"{many} ranks x 1 threads already take more" in cannot_lend(torch.device("cpu"), many)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "host0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 of the 4 ranks are here
    assert "other machines" in cannot_lend(torch.device("cpu"), 1)
    assert lent_threads(schedule, 0, torch.device("cpu"), 1) == {}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cannot_lend(torch.device("cpu"), 1) is None
