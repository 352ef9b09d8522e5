"""Encoder-decoder (T5) generation throughput and per-token latency: pipelined, one process, uncached.

    python benchmarks/generate_seq2seq.py [--repeats 3] [--new-tokens 32] [--pp 1 2]

For pp in ``--pp`` and batch (sources) in ``--batches``, greedy, no end token, random
sources of mixed lengths (``--min-source``..``--max-source``), a t5 model (llama
flavour) of ``--layers`` encoder and as many decoder layers:

  conveyor   ``Seq2SeqGenerator`` on pp ranks (one thread each), the batch in
             ``min(batch, pp)`` microbatches; at pp=1 the same without a mesh;
  single     for pp > 1: the whole model in one process with pp threads (the same
             total threads), the same ``Seq2SeqGenerator`` without a mesh;
  uncached   at pp=1: the no-cache reference, the full model (source and decoder
             prefix) rerun at every step, the whole batch at once.

Fields as in ``generate_throughput.py`` (tokens_per_s, latency median/p90 between a
sequence's tokens, ttft_s, wall_s_all, others_cpu, load_1m, oversubscribed); conveyor
lines carry the simulator's prediction the same way (``sim_*``: each stage's round 0,
the encoder included, and a decode round timed here in one thread; every message
costed at the decoder stream's size, so round 0's ``encoder`` tensor is under-counted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conveyor.config import ModelConfig  # noqa: E402
from conveyor.generation.batch import Sampling  # noqa: E402
from conveyor.generation.seq2seq import Seq2SeqBatch, Seq2SeqStack, t5_specials  # noqa: E402
from conveyor.parallel.layout import resolve_partition  # noqa: E402
from conveyor.parallel.mesh import Mesh  # noqa: E402
from conveyor.runtime.generate import build_stage  # noqa: E402
from conveyor.runtime.launch import launch  # noqa: E402
from conveyor.runtime.seq2seq import Seq2SeqGenerator  # noqa: E402
from generate_throughput import Spec, _Clock, _line, _microbatches, predict  # noqa: E402
from sim_accuracy import _Usage  # noqa: E402

GREEDY = Sampling(temperature=0, stop_at_eot=False)


def _run(gen: Seq2SeqGenerator, sources: list[list[int]], spec: Spec, pp: int) -> _Clock:
    clock = _Clock()
    gen.generate(sources, spec.new_tokens, GREEDY, microbatches=_microbatches(pp, len(sources)),
                 on_token=clock)
    return clock


@torch.no_grad()
def _run_uncached(blocks: dict, sources: list[list[int]], spec: Spec) -> _Clock:
    """The full model on (sources, start + prefix) at every step, the batch at once."""
    clock = _Clock()
    pad = t5_specials(spec.cfg).pad
    width = max(len(s) for s in sources)
    src = torch.tensor([s + [pad] * (width - len(s)) for s in sources])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    dec = torch.full((len(sources), 1), pad)
    for _ in range(spec.new_tokens):
        x: Any = {"tokens": src, "attention_mask": mask, "decoder_tokens": dec,
                  "decoder_mask": torch.ones_like(dec)}
        for block in blocks.values():
            x = block(x)
        tokens = x[:, -1].argmax(dim=-1)
        for i, t in enumerate(tokens.tolist()):
            clock(i, t)
        dec = torch.cat([dec, tokens[:, None]], dim=1)
    return clock


def _record(out: dict[str, Any], key: str, clock: _Clock, usage: _Usage) -> None:
    rec = out.setdefault(key, {"wall": [], "gaps": [], "firsts": [], "usage": []})
    rec["wall"].append(time.perf_counter() - clock.start)
    rec["gaps"] += clock.gaps()
    rec["firsts"] += clock.firsts()
    rec["usage"].append(usage.done())


def _ranks(spec: Spec, pp: int, batches: list[int]) -> dict[str, Any]:
    """On every rank: each batch ``repeats`` times; what this rank saw."""
    mesh = Mesh.build(pp)
    blocks = build_stage(spec.cfg, resolve_partition(spec.cfg, pp), mesh.pp_rank)
    gen = Seq2SeqGenerator(blocks, spec.cfg, mesh, timeout_s=600)
    _run(gen, spec.prompts[:1], spec, pp)  # warm-up: caches, allocator, messages
    out: dict[str, Any] = {}
    for _ in range(spec.repeats):
        for b in batches:
            dist.barrier()
            usage = _Usage()
            clock = _run(gen, spec.prompts[:b], spec, pp)
            dist.barrier()
            _record(out, f"conveyor-{b}", clock, usage)
    return out


def _single(spec: Spec, batches: list[int], uncached: bool) -> dict[str, Any]:
    """The whole model in this one process, with the threads it was started with."""
    blocks = build_stage(spec.cfg, resolve_partition(spec.cfg, 1), 0)
    gen = Seq2SeqGenerator(blocks, spec.cfg)
    _run(gen, spec.prompts[:1], spec, 1)
    out: dict[str, Any] = {}
    for _ in range(spec.repeats):
        for b in batches:
            usage = _Usage()
            _record(out, f"conveyor-{b}", _run(gen, spec.prompts[:b], spec, 1), usage)
            if uncached:
                usage = _Usage()
                _record(out, f"uncached-{b}", _run_uncached(blocks, spec.prompts[:b], spec), usage)
    return out


@torch.no_grad()
def stage_costs(spec: Spec, pp: int, batch: int) -> tuple[list[float], list[float]]:
    """Seconds of each stage's round 0 (encoder and start token) and of a decode round."""
    torch.set_num_threads(1)
    part = resolve_partition(spec.cfg, pp)
    sb = Seq2SeqBatch(spec.prompts[:batch], spec.new_tokens, spec.cfg, _microbatches(pp, batch))
    cpu, d = torch.device("cpu"), spec.cfg.d_model
    prefill, decode = [], []
    for s in range(pp):
        blocks = build_stage(spec.cfg, part, s)
        first = sb.tokens(sb.rows(0), cpu)
        x_pre: Any = first if s == 0 else {
            "hidden": torch.randn(sb.size, 1, d), "encoder": torch.randn(sb.size, sb.source_len, d),
            "attention_mask": first["attention_mask"]}
        x_dec = first["decoder_tokens"] if s == 0 else torch.randn(sb.size, 1, d)
        pre, dec = [], []
        for _ in range(5):
            stack = Seq2SeqStack(blocks, sb.size, sb.cache_len)
            t0 = time.perf_counter()
            stack(x_pre, 0)
            t1 = time.perf_counter()
            stack(x_dec, spec.new_tokens // 2)  # half way: attention over half the cache
            pre.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
        prefill.append(statistics.median(pre))
        decode.append(statistics.median(dec))
    return prefill, decode


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every case; print JSON lines; return them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-source", type=int, default=8)
    ap.add_argument("--max-source", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4, help="encoder layers (as many decoder)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    cfg = ModelConfig(family="t5", flavour="llama", vocab_size=args.vocab, n_layers=args.layers,
                      d_model=args.d_model, n_heads=args.heads,
                      max_seq_len=max(args.max_source, args.new_tokens), tie_embeddings=True)
    rng = random.Random(0)
    sources = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(args.min_source,
                                                                           args.max_source))]
               for _ in range(max(args.batches))]
    spec = Spec(cfg, sources, args.new_tokens, args.repeats)
    lines = []
    for pp in args.pp:
        single = launch(_single, 1, spec, args.batches, pp == 1, threads_per_rank=pp,
                        timeout_s=1800)[0]
        per_rank = {0: single} if pp == 1 else launch(_ranks, pp, spec, pp, args.batches,
                                                      timeout_s=1800)
        for b in args.batches:
            line = _line("conveyor", pp, b, pp, [per_rank[r][f"conveyor-{b}"]
                                                 for r in sorted(per_rank)], spec)
            sb = Seq2SeqBatch(spec.prompts[:b], spec.new_tokens, cfg, _microbatches(pp, b))
            line |= predict(spec, pp, b, stage_costs(spec, pp, b), sb)
            lines.append(line | {"family": "t5"})
            other = "single" if pp > 1 else "uncached"
            key = f"{'conveyor' if pp > 1 else 'uncached'}-{b}"
            lines.append(_line(other, pp, b, pp, [single[key]], spec) | {"family": "t5"})
            for line in lines[-2:]:
                print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
