"""``--compile``: every block under ``torch.compile`` still trains exactly like one process.

1F1B and ZB-V at pp=2 (ZB-V's split backward runs the compiled blocks' deferred weight
grads at W), one of them under NCCL semantics. Inductor compiles to C++ on CPU: without
a C++ compiler the test skips and says so.
"""

from __future__ import annotations

import shutil

import pytest

from equivalence import Case, assert_equivalent, reference, run_pipeline_cases

pytestmark = pytest.mark.multiprocess

CASES = [Case("1f1b", 2, 4, compile=True),
         Case("zb-v", 2, 4, compile=True, flavour="llama", tied=True, nccl=True)]


@pytest.fixture(scope="module")
def results() -> dict:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (inductor): install g++")
    return run_pipeline_cases(CASES, world=2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiled_blocks_match_single_process(case: Case, results: dict) -> None:
    assert_equivalent(case, results[str(case)], reference(case))


def test_compile_is_a_boolean() -> None:
    from conveyor.config import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="compile='yes' must be true or false"):
        ParallelConfig(compile="yes")  # type: ignore[arg-type]
