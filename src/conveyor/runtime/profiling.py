"""What profiling runs of the runtime, handed to ``sim`` and ``plan`` as one object.

``sim`` and ``plan`` never import the runtime (``tests/test_layering.py``); the layers
that may (the commands, the trainer, benchmarks, tests) pass this down when a
profile is taken: the launcher that starts local ranks and the stage runner whose
methods are timed.
"""

from __future__ import annotations

from ..sim.profile import Runtime
from .launch import launch
from .stage import StageRunner

__all__ = ["profiling_runtime"]


def profiling_runtime() -> Runtime:
    """The runtime's launcher and stage runner, for ``sim`` and ``plan`` to profile with."""
    return Runtime(launch=launch, stage_runner=StageRunner)
