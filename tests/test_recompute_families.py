"""Selective recomputation in encoder families: MaskedAttention's core is recomputed too.

Pipelined equivalence with ``recompute="selective"`` (bert and t5, pp=2) is in
test_equivalence.py; here: the stage runner switches every attention, and what each
mode keeps is ordered, and for a BERT layer what sim/activations.py predicts.
"""

from __future__ import annotations

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.data.objectives import batch_maker
from conveyor.memory import count_saved_bytes
from conveyor.models import build_blocks
from conveyor.models.attention import MaskedAttention
from conveyor.models.stack import EncoderLayer
from conveyor.runtime.stage import StageRunner
from conveyor.sim.activations import layer_elements

B, S = 2, 32
CFGS = {"bert": ModelConfig(family="bert", vocab_size=256, n_layers=2, d_model=64, n_heads=4,
                            max_seq_len=S),
        "t5": ModelConfig(family="t5", flavour="llama", vocab_size=256, n_layers=2, d_model=64,
                          n_heads=4, max_seq_len=S)}


def _peak(cfg: ModelConfig, recompute: bool | str) -> int:
    runner = StageRunner(0, dict(enumerate(build_blocks(cfg, 0))), num_microbatches=1,
                         recompute=recompute)
    attentions = [m for b in runner.blocks.values() for m in b.modules()
                  if isinstance(m, MaskedAttention)]
    assert attentions and all(a.recompute_core == (recompute == "selective") for a in attentions)
    rows = torch.randint(0, 200, (B, S + 1)).numpy()
    inputs, targets = batch_maker(cfg, 0)(rows, torch.arange(B).numpy(), 0)
    runner.forward(0, inputs, targets)
    return runner.meter.peak


@pytest.mark.parametrize("family", sorted(CFGS))
def test_selective_keeps_less_than_none_and_more_than_full(family: str) -> None:
    cfg = CFGS[family]
    none, selective, full = (_peak(cfg, r) for r in (False, "selective", True))
    assert full < selective < none


def test_bert_layer_keeps_what_the_planner_predicts() -> None:
    cfg = CFGS["bert"]
    layer = EncoderLayer(cfg)
    state = {"hidden": torch.randn(B, S, cfg.d_model, requires_grad=True),
             "attention_mask": torch.ones(B, S, dtype=torch.long)}
    for mode in ("none", "selective"):
        layer.attn.recompute_core = mode == "selective"
        with count_saved_bytes([layer]) as saved:
            layer(state)
        predicted = B * S * 4 * layer_elements(cfg, recompute=mode)
        assert saved.total == pytest.approx(predicted, rel=0.01), mode
