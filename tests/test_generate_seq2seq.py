"""Encoder-decoder generation: cached decoding == the full model rerun at every step."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

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
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.partition import Partition, uniform
from conveyor.runtime.generate import build_stage
from conveyor.runtime.launch import launch
from conveyor.runtime.seq2seq import Seq2SeqGenerator

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


# -- on the executor -----------------------------------------------------------------------

# (name, partition sizes or None for uniform, nccl, microbatch counts)
PIPELINED = {
    2: [("uniform", None, False, (2, 3)),
        ("sampled", None, False, (2,)),
        ("last encoder + bridge + first decoder on stage 1", (2, 5), True, (2,)),
        ("encoder-only stage 0", (3, 4), False, (4,))],
    4: [("uniform", None, True, (3,))],
}


def test_executor_at_pp1_equals_the_single_process_path() -> None:
    model = SequentialModel(T5, seed=3).eval()
    expected = generate_seq2seq(model.blocks, T5, SOURCES, 9, GREEDY)
    gen = Seq2SeqGenerator(dict(enumerate(model.blocks)), T5)
    for m, rounds in ((1, 16), (2, 3), (4, 2)):
        assert gen.generate(SOURCES, 9, GREEDY, microbatches=m, segment_rounds=rounds) == expected
    eos = expected[0][2]
    finished: list[int] = []
    got = gen.generate(SOURCES, 9, replace(GREEDY, eot_id=eos), microbatches=2,
                       on_done=finished.append, segment_rounds=2)
    assert got == generate_seq2seq(model.blocks, T5, SOURCES, 9, replace(GREEDY, eot_id=eos))
    assert len(got[0]) == 2 and sorted(finished) == list(range(len(SOURCES)))


def _pipelined(pp: int) -> list[tuple[str, list[list[int]]]]:
    mesh = Mesh.build(pp)
    out = []
    for name, sizes, nccl, counts in PIPELINED[pp]:
        part = uniform(T5.num_blocks, pp) if sizes is None else Partition.from_sizes(sizes)
        blocks = build_stage(T5, part, mesh.pp_rank, seed=3)
        gen = Seq2SeqGenerator(blocks, T5, mesh, timeout_s=60, emulate_nccl=nccl)
        sampling = SAMPLED if name == "sampled" else GREEDY
        for m in counts:
            got = gen.generate(SOURCES, 9, sampling, microbatches=m, segment_rounds=3)
            out.append((f"{name} nccl={nccl} m={m}", got))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("pp", [2, 4])
def test_pipelined_equals_single_process_greedy(pp: int) -> None:
    model = SequentialModel(T5, seed=3).eval()
    expected = [full_forward_greedy(model, s, 9) for s in SOURCES]
    assert generate_seq2seq(model.blocks, T5, SOURCES, 9, GREEDY) == expected
    sampled = generate_seq2seq(model.blocks, T5, SOURCES, 9, SAMPLED)
    for rank, cases in launch(_pipelined, pp, pp, timeout_s=120).items():
        assert len(cases) == sum(len(c[3]) for c in PIPELINED[pp])
        for name, got in cases:
            assert got == (sampled if name.startswith("sampled") else expected), \
                f"rank {rank}, {name}"


def test_seq2seq_generation_moves_no_tensors_itself() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "conveyor"
    pattern = re.compile(r"\b(dist|torch\.distributed|isend|irecv|send|recv|broadcast|"
                         r"all_reduce|batch_isend_irecv|P2POp|wait_work)\b")
    for path in (src / "runtime" / "seq2seq.py", src / "generation" / "seq2seq.py"):
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)
                and not line.lstrip().startswith(("#", '"'))]
        assert not hits, f"{path.name} moves tensors itself: {hits}"


@pytest.mark.multiprocess
def test_seq2seq_benchmark_prints_complete_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import generate_seq2seq
    finally:
        sys.path.remove(str(benchmarks))
    generate_seq2seq.main(["--pp", "2", "--batches", "3", "--repeats", "1", "--new-tokens", "3",
                           "--layers", "1", "--d-model", "32", "--vocab", "128",
                           "--max-source", "10"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["impl"], d["family"]) for d in lines] == [("conveyor", "t5"), ("single", "t5")]
    for d in lines:
        assert d["batch"] == 3 and d["tokens_per_s"] > 0 and d["latency_median_s"] > 0, d
    assert lines[0]["microbatches"] == 2 and lines[0]["sim_tokens_per_s"] > 0
