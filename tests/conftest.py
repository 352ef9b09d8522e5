"""Shared fixtures: a tiny text corpus for end-to-end runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("stage rank sends activations forward while gradients flow back through the "
         "pipeline and every microbatch waits its turn").split()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four small text files of random sentences from a 20-word vocabulary."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        text = "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
            for _ in range(150)
        )
        (root / f"doc{i}.txt").write_text(text)
    return root
