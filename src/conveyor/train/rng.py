"""Every random number generator a rank draws from, as JSON for checkpoints and back.

torch's CPU generator, each CUDA device's (when CUDA is up), Python's ``random`` and
NumPy's global generator: a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """This process's generator states, JSON-serialisable."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(saved: dict[str, Any]) -> None:
    """Set the generators ``capture_rng`` recorded (those it did not record are left alone)."""
    if "torch" in saved:
        torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "python" in saved:
        version, state, gauss = saved["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in saved:
        kind, keys, pos, has_gauss, cached = saved["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = saved.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
