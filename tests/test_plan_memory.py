"""The planner's activation model against the runtime's meter (same StageRunner, same count)."""

from __future__ import annotations

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.models import build_blocks
from conveyor.runtime.stage import StageRunner
from conveyor.sim.activations import block_activations, recompute_mode

MODELS = {
    "gpt2": ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, max_seq_len=32),
    "llama": ModelConfig(flavour="llama", vocab_size=256, n_layers=2, d_model=64, n_heads=4,
                         max_seq_len=32),
    "llama-gqa": ModelConfig(flavour="llama", vocab_size=256, n_layers=2, d_model=64,
                             n_heads=4, n_kv_heads=2, max_seq_len=32),
}


@pytest.mark.parametrize("recompute", [False, "selective", True], ids=str)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_predicted_activation_bytes_match_the_meter(name: str, recompute: bool | str) -> None:
    cfg, b, s = MODELS[name], 2, 32
    blocks = build_blocks(cfg, seed=0)
    # the whole model as one stage: embedding, both layers and the head's loss
    runner = StageRunner(0, dict(enumerate(blocks)), num_microbatches=1, recompute=recompute)
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    runner.forward(0, tokens, torch.randint(0, cfg.vocab_size, (b, s)))
    predicted = sum(block_activations(cfg, b, s, recompute=recompute_mode(recompute)))
    assert predicted == pytest.approx(runner.meter.peak, rel=0.10)
    # in fact it is the same count, up to the loss's scalar
    assert abs(predicted - runner.meter.peak) <= 16


def test_recompute_modes_order_memory() -> None:
    cfg = MODELS["llama"]
    none, selective, full = (sum(block_activations(cfg, 1, 32, recompute=m))
                             for m in ("none", "selective", "full"))
    assert full < selective < none
    # tensor and sequence parallelism divide what each rank keeps
    tp = sum(block_activations(cfg, 1, 32, tp=2))
    sp = sum(block_activations(cfg, 1, 32, tp=2, sequence_parallel=True))
    assert sp < tp < none
