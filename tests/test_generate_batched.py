"""Many prompts at once on the executor: the ring schedule, padding, pp 1/2/4, NCCL semantics."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.generation import CachedBlocks, generate
from conveyor.generation.batch import PromptBatch, Sampling, Tracker
from conveyor.models import Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.partition import uniform
from conveyor.runtime.generate import PipelinedGenerator, build_stage
from conveyor.runtime.launch import launch
from conveyor.schedules import lower, validate
from conveyor.schedules.generation import GenerationSegment, generation_segment

# peaked logits (init_std 0.5): rounding between batched and single matmuls cannot flip a pick
GPT2 = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, max_seq_len=24, init_std=0.5)
LLAMA = replace(GPT2, flavour="llama", n_kv_heads=2, tie_embeddings=True)
# mixed lengths, one that fills the context early (19 + 6 new > 24 positions)
PROMPTS = [[5, 17, 3, 42, 8], [1], [9, 9, 2], list(range(3, 22)), [3, 3]]
GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=11)


def _alone(model: Transformer, sampling: Sampling, n: int, eot: int | None = None) -> list[list[int]]:
    s = sampling
    return [generate(model, p, n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                     seed=s.seed, eot_id=eot) for p in PROMPTS]


# -- the schedule (pure) ---------------------------------------------------------------


def test_segment_is_a_ring_with_a_relay() -> None:
    s = generation_segment(2, 2, 2)
    assert s.table() == "rank 0: 0F0 0F1 2F0 2F1 4F0 4F1\nrank 1: 1F0 1F1 3F0 3F1"
    seg = GenerationSegment(2, 2)
    assert [seg.crossing(b) for b in range(4)] == ["hidden", "next", "hidden", "tokens"]
    assert [seg.round_of(v) for v in range(5)] == [0, 0, 1, 1, None]
    # the last rank hands tokens to rank 0 over its own link, in the schedule's order
    low = lower(generation_segment(3, 2, 2))
    assert [str(a) for a in low.actions[2] if not a.kind.is_compute][:3] == [
        "2RECV_F0", "2SEND_F0", "2RECV_F1"]
    assert "3RECV_F0" in [str(a) for a in low.actions[0]]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_ring_stays_full_when_microbatches_cover_the_ranks(p: int) -> None:
    rounds = 8
    stats = validate(generation_segment(p, rounds, p))
    # unit costs: every rank busy from its first round to its last, fill and drain only
    assert stats.steady_bubble_fraction == 0.0
    assert stats.makespan == rounds * p + (p - 1) * 2


def test_prompt_batch_pads_left_and_fills_the_last_microbatch() -> None:
    batch = PromptBatch(PROMPTS, 6, GPT2, 2)
    assert (batch.size, batch.num_microbatches, batch.prompt_len) == (3, 2, 19)
    assert batch.rows(1) == [3, 4, -1]
    tokens = batch.tokens(batch.rows(0), torch.device("cpu"))
    assert tokens[1].tolist() == [0] * 18 + [1]
    assert batch.padding(batch.rows(1), torch.device("cpu")).pad.tolist() == [0, 17, 18]
    assert batch.budgets[3] == GPT2.max_seq_len - 19 + 1


# -- one rank ----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama-gqa-tied"])
def test_batched_equals_each_prompt_alone_on_one_rank(cfg: ModelConfig) -> None:
    model = Transformer(cfg, seed=3)
    gen = PipelinedGenerator(dict(enumerate(model.blocks)), cfg)
    for sampling, runs in ((GREEDY, ((1, 16), (2, 3), (5, 4))), (SAMPLED, ((2, 3),))):
        expected = _alone(model, sampling, 10)
        for m, rounds in runs:
            assert gen.generate(PROMPTS, 10, sampling, microbatches=m,
                                segment_rounds=rounds) == expected, (sampling, m, rounds)


def test_sequences_stop_at_their_end_token_and_stream_in_order() -> None:
    model = Transformer(GPT2, seed=3)
    eot = _alone(model, GREEDY, 6)[0][2]
    expected = _alone(model, GREEDY, 6, eot)
    assert any(len(e) < 6 for e in expected)
    gen = PipelinedGenerator(dict(enumerate(model.blocks)), GPT2)
    seen: list[tuple[int, int]] = []
    finished: list[int] = []
    got = gen.generate(PROMPTS, 6, replace(GREEDY, eot_id=eot), microbatches=2,
                       on_token=lambda i, t: seen.append((i, t)), on_done=finished.append,
                       segment_rounds=2)
    assert got == expected
    assert [[t for i, t in seen if i == k] for k in range(len(PROMPTS))] == expected
    assert sorted(finished) == list(range(len(PROMPTS)))


# -- pipelined ---------------------------------------------------------------------------


def _pipelined_cases(pp: int) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    mesh = Mesh.build(pp)
    out = []
    cases = [(GPT2, GREEDY, False), (LLAMA, GREEDY, True)]
    for cfg, sampling, nccl in cases + ([(GPT2, SAMPLED, True)] if pp == 2 else []):
        reference = Transformer(cfg, seed=3)
        blocks = build_stage(cfg, uniform(cfg.num_blocks, pp), mesh.pp_rank, seed=3)
        gen = PipelinedGenerator(blocks, cfg, mesh, timeout_s=60, emulate_nccl=nccl)
        for m in ((2, 3) if pp == 2 else (3,)):  # as many as ranks, more; fewer
            got = gen.generate(PROMPTS, 8, sampling, microbatches=m, segment_rounds=3)
            out.append((f"{cfg.flavour} T={sampling.temperature} nccl={nccl} m={m}",
                        got, _alone(reference, sampling, 8)))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("pp", [2, 4])
def test_pipelined_batch_equals_each_prompt_alone(pp: int) -> None:
    for rank, cases in launch(_pipelined_cases, pp, pp, timeout_s=120).items():
        for name, got, expected in cases:
            assert got == expected, f"rank {rank}, {name}"


def test_runtime_generate_moves_no_tensors_itself() -> None:
    """Every tensor between ranks goes through the executor and its P2P layer."""
    src = Path(__file__).resolve().parents[1] / "src" / "conveyor" / "runtime" / "generate.py"
    pattern = re.compile(r"\b(dist|torch\.distributed|isend|irecv|broadcast|all_reduce|"
                         r"batch_isend_irecv|P2POp|wait_work)\b")
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(src.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, "runtime/generate.py sends or receives by itself:\n" + "\n".join(hits)


@pytest.mark.multiprocess
def test_throughput_benchmark_prints_complete_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import generate_throughput
    finally:
        sys.path.remove(str(benchmarks))
    generate_throughput.main(["--pp", "2", "--batches", "3", "--repeats", "1",
                              "--new-tokens", "3", "--layers", "2", "--d-model", "32",
                              "--vocab", "128", "--max-prompt", "10"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d.get("impl") for d in lines] == ["conveyor", "old", "single", None]
    for d in lines[:-1]:
        assert d["batch"] == 3 and d["tokens_per_s"] > 0 and d["latency_median_s"] > 0, d
    assert lines[0]["microbatches"] == 2 and lines[0]["sim_tokens_per_s"] > 0
    assert lines[-1]["speedup_vs_old"] > 0 and lines[-1]["ratio_vs_single"] > 0


def test_finished_sequences_leave_their_rows() -> None:
    batch = PromptBatch(PROMPTS, 6, GPT2, 2)
    tracker = Tracker(batch, GREEDY)
    assert tracker.regroup(2) is None  # nobody finished: the layout stays
    tracker.done[1] = tracker.done[3] = True
    picks = tracker.regroup(2)
    # three sequences left, in order, in two microbatches of two (one idle row)
    assert tracker.layout == [[0, 2], [4, -1]]
    assert picks == [[(0, 0), (0, 2)], [(1, 1), (0, 0)]]
    model = Transformer(GPT2, seed=3)
    stacks = [CachedBlocks(dict(enumerate(model.blocks)), GPT2, 3, batch.cache_len,
                           padding=batch.padding(batch.rows(mb), torch.device("cpu")))
              for mb in range(2)]
    moved = CachedBlocks.gather(stacks, picks[1])
    assert moved.padding is not None and moved.padding.pad.tolist() == [17, 14]  # prompts 4 and 0
    assert torch.equal(moved.caches[1].k[0], stacks[1].caches[1].k[1])
    tracker.done = [True] * len(PROMPTS)
    assert tracker.regroup(2) == [] and tracker.layout == []
