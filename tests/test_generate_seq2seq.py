"""Encoder-decoder generation: cached decoding == the full model rerun at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.generation.batch import Sampling, Tracker
from conveyor.generation.seq2seq import (
    Seq2SeqBatch,
    Seq2SeqStack,
    generate_seq2seq,
    t5_specials,
)
from conveyor.models import SequentialModel

# peaked logits (init_std 0.5): rounding between batched and single matmuls cannot flip a pick
T5 = ModelConfig(family="t5", flavour="llama", vocab_size=96, n_layers=2, d_model=32, n_heads=4,
                 max_seq_len=16, init_std=0.5, tie_embeddings=True)
T5_GPT2 = replace(T5, flavour="gpt2", tie_embeddings=False)
SOURCES = [[5, 17, 3, 42, 8, 9, 11], [1], [9, 9, 2], [3, 3, 4, 5]]
GREEDY = Sampling(temperature=0, eot_id=-1)  # no end token: every step is compared
SAMPLED = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=11, eot_id=-1)


@torch.no_grad()
def full_forward_greedy(model: SequentialModel, source: list[int], n: int,
                        eos: int | None = None) -> list[int]:
    """The no-cache reference: the whole model on (source, start + prefix) at every step."""
    start = t5_specials(model.cfg).pad
    src = torch.tensor([source])
    out: list[int] = []
    for _ in range(n):
        dec = torch.tensor([[start] + out])
        logits = model({"tokens": src, "attention_mask": torch.ones_like(src),
                        "decoder_tokens": dec, "decoder_mask": torch.ones_like(dec)})
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("cfg", [T5, T5_GPT2], ids=["llama-tied", "gpt2"])
def test_cached_greedy_equals_full_forward_for_a_mixed_batch(cfg: ModelConfig) -> None:
    model = SequentialModel(cfg, seed=3).eval()
    expected = [full_forward_greedy(model, s, 9) for s in SOURCES]
    assert len({tuple(e) for e in expected}) > 1  # the sources lead somewhere different
    assert generate_seq2seq(model.blocks, cfg, SOURCES, 9, GREEDY) == expected
    for s, e in zip(SOURCES, expected, strict=True):  # each alone as in the batch
        assert generate_seq2seq(model.blocks, cfg, [s], 9, GREEDY) == [e]


def test_stops_at_eos_and_at_the_decoder_context() -> None:
    model = SequentialModel(T5, seed=3).eval()
    eos = full_forward_greedy(model, SOURCES[0], 4)[2]
    expected = [full_forward_greedy(model, s, 9, eos) for s in SOURCES]
    assert len(expected[0]) == 2 and expected != [full_forward_greedy(model, s, 9) for s in SOURCES]
    seen: list[tuple[int, int]] = []
    got = generate_seq2seq(model.blocks, T5, SOURCES, 9, replace(GREEDY, eot_id=eos),
                           on_token=lambda i, t: seen.append((i, t)))
    assert got == expected
    assert [[t for i, t in seen if i == k] for k in range(len(SOURCES))] == expected
    # the decoder sees max_seq_len positions: the start token and all but the last new one
    long = generate_seq2seq(model.blocks, T5, SOURCES[:1], 40, GREEDY)[0]
    assert len(long) == T5.max_seq_len


def test_default_end_token_is_t5_eos_and_sampling_is_per_source() -> None:
    model = SequentialModel(T5, seed=3).eval()
    batch = Seq2SeqBatch(SOURCES, 5, T5, 1)
    assert Tracker(batch, Sampling()).sampling.eot_id is None
    sampled = generate_seq2seq(model.blocks, T5, SOURCES, 6, SAMPLED)
    # a source sampled in a batch draws what it draws alone (its own generator)
    assert sampled == [generate_seq2seq(model.blocks, T5, [s], 6, SAMPLED)[0] for s in SOURCES]


def test_batch_pads_sources_right_and_moves_caches_with_rows() -> None:
    batch = Seq2SeqBatch(SOURCES, 6, T5, 2)
    assert (batch.size, batch.num_microbatches, batch.source_len) == (2, 2, 7)
    state = batch.tokens([1, -1], torch.device("cpu"))
    pad = t5_specials(T5).pad
    assert state["tokens"][0].tolist() == [1] + [pad] * 6
    assert state["attention_mask"].tolist() == [[1, 0, 0, 0, 0, 0, 0]] * 2  # idle: one key
    assert state["decoder_tokens"].tolist() == [[pad], [pad]]
    model = SequentialModel(T5, seed=3).eval()
    blocks = dict(enumerate(model.blocks))
    stacks = [Seq2SeqStack(blocks, 2, batch.cache_len) for _ in range(2)]
    with torch.no_grad():
        for mb, stack in enumerate(stacks):
            stack(batch.tokens(batch.rows(mb), torch.device("cpu")), 0)
    moved = Seq2SeqStack.gather(stacks, [(1, 1), (0, 0)])
    layer = next(iter(moved.caches))
    assert torch.equal(moved.caches[layer].k[0], stacks[1].caches[layer].k[1])
    assert torch.equal(moved.memory[layer][0][1], stacks[0].memory[layer][0][0])
    assert moved.source_mask is not None
    assert moved.source_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
