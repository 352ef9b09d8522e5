"""``conveyor generate``: continue prompts with a trained or exported model.

``--checkpoint`` takes a checkpoint directory, a run directory (its latest
checkpoint) or an exported model directory (config.json + model.safetensors).
With ``--pp 1`` the model runs in this process; with more, one pipeline stage per
spawned rank, each loading only its own blocks; both run the same generation
schedules on the executor (:mod:`conveyor.runtime.generate`).

One ``--prompt`` is printed, then each new piece of text as soon as it is
complete. A ``--prompts-file`` (``.txt``: one prompt per line, blank lines
skipped; ``.jsonl``: one ``{"prompt": ...}`` object per line) is generated
``--batch-size`` prompts at a time (the shortest first: a batch is padded to its
longest prompt) in ``--microbatches`` microbatches, with a
progress bar on stderr, and written as JSON lines (``--output``, else stdout).
Generation stops after ``--max-new-tokens``, at the end-of-text token, or when the
model's ``max_seq_len`` positions are full (a note on stderr says so).

An encoder-decoder (t5) maps each prompt, its *source*, to an output
(:mod:`conveyor.runtime.seq2seq`): the source is encoded with T5's eos appended, as
in training; the output stops at eos, and is printed (streamed for one ``--prompt``)
or written as ``{"source", "output"}`` lines without special tokens. An encoder
(bert) labels text rather than generating it: ``conveyor predict``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import safetensors
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from ..config import ConfigError, ModelConfig
from ..data.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer
from ..generation import GenerationError, TextStream, check_prompt, context_budget
from ..generation.batch import Sampling
from ..generation.seq2seq import output_ids, source_ids
from ..models.families import family_of
from ..parallel.layout import resolve_partition
from ..parallel.mesh import Mesh
from ..runtime.generate import build_stage
from ..runtime.launch import default_backend, launch
from ..runtime.seq2seq import generator_class
from ..schedules.validate import TimedAction
from ..sim.render import write_chrome_trace
from ..train.checkpoint import CheckpointError, load_tensors, read_meta, resolve_checkpoint
from ..train.checkpoint_files import checkpoint_tokenizer
from ..train.export import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    model_config_from,
    read_exported_config,
)
from .checks import positive

__all__ = ["register", "read_prompts"]


def register(sub: Any) -> None:
    """Add ``generate`` to the CLI."""
    p = sub.add_parser(
        "generate",
        help="continue a prompt (or a file of prompts) with a trained or exported model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint dir, run dir (latest checkpoint) or exported model dir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue (t5: the source), streamed to stdout")
    what.add_argument("--prompts-file", type=Path,
                      help=".txt (one prompt a line) or .jsonl ({\"prompt\": ...} or "
                      "{\"source\": ...} a line)")
    p.add_argument("--output", type=Path, default=None,
                   help="write results here as JSON lines (unset: stdout for a prompts file, "
                   "streamed text for a prompt)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 always picks the most likely token")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="sample among the most likely tokens holding this mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks to split the model over")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts of a file generated together (their KV caches held at once)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="microbatches a batch is split into (unset: pp, the fewest that keep "
                   "every stage busy)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to use instead of the one the checkpoint names")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a pipeline rank waits for a peer before giving up")
    p.add_argument("--trace", type=Path, default=None,
                   help="write every rank's executor actions as a Chrome/Perfetto trace here")
    p.set_defaults(run=_run)


@dataclass(frozen=True)
class _Source:
    """Where the model's config, weights and tokenizer are (picklable, sent to every rank)."""

    cfg: ModelConfig
    weights: Path  # a checkpoint dir, or an exported model.safetensors
    exported: bool
    tokenizer: Path | None

    def loader(self) -> Callable[[Sequence[str]], Mapping[str, Tensor]]:
        """Global tensor names -> tensors, read from the checkpoint or the export."""
        if self.exported:
            return functools.partial(_read_safetensors, self.weights)
        return functools.partial(load_tensors, self.weights)


@dataclass(frozen=True)
class _Job:
    """Everything a rank needs to generate."""

    source: _Source
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_new_tokens: int
    sampling: Sampling
    pp: int
    batch_size: int
    microbatches: int | None
    timeout_s: float
    stream: bool  # print one prompt's text as it comes
    trace: bool


def _read_safetensors(path: Path, names: Sequence[str]) -> dict[str, Tensor]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in stored}
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); export the model again") from None


def _open_source(path: Path, tokenizer: Path | None) -> _Source:
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():
        cfg = read_exported_config(path)
        return _Source(cfg, path / MODEL_FILE, True, tokenizer or path / TOKENIZER_FILE)
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = model_config_from(meta.get("model"), f"checkpoint {ckpt}/meta.json ('model')")
    return _Source(cfg, ckpt, False, tokenizer or checkpoint_tokenizer(ckpt, meta))


def _own_tokenizer(path: Path) -> Path | None:
    """The tokenizer the model came with (what --tokenizer replaces), if it names one."""
    return _open_source(path, None).tokenizer


def _check_finite(blocks: Mapping[int, torch.nn.Module], where: Path) -> None:
    bad = [f"blocks.{i}.{n}" for i, b in blocks.items() for n, p in b.named_parameters()
           if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{where}: weights are not finite (NaN or inf) in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; the run "
                              "diverged: generate from an earlier checkpoint")


def _tokenizer(source: _Source) -> Tokenizer:
    if source.tokenizer is None:
        raise CheckpointError("the checkpoint names no tokenizer; pass --tokenizer "
                              "PATH/tokenizer.json (the one the model was trained with)")
    return load_tokenizer(source.tokenizer)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a .txt (one a line, blank lines skipped) or .jsonl file; GenerationError if bad."""
    if path.suffix not in (".txt", ".jsonl"):
        raise GenerationError(f"--prompts-file {path} must end in .txt (one prompt a line) or "
                              '.jsonl (one {"prompt": "..."} a line)')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GenerationError(f"cannot read --prompts-file {path} ({err}); pass a UTF-8 "
                              "text file") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationError(f"{path}:{n} is not JSON ({err.msg}); write one "
                                  '{"prompt": "..."} object per line') from None
        prompt = record.get("prompt", record.get("source")) if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            raise GenerationError(f'{path}:{n} has no "prompt" string (or "source", for t5); '
                                  'write one {"prompt": "..."} object per line')
        prompts.append(prompt)
    if not prompts:
        raise GenerationError(f"--prompts-file {path} holds no prompt; write one per line")
    return prompts


class _Printer:
    """Writes the prompt (not an encoder-decoder's source), then each completed piece of text."""

    def __init__(self, tokenizer: Tokenizer, job: _Job) -> None:
        seq2seq = family_of(job.source.cfg).seq2seq
        self.stream = TextStream(_text_of(tokenizer, job.source.cfg),
                                 [] if seq2seq else job.prompt_ids[0])
        self._write("" if seq2seq else job.prompts[0])

    def __call__(self, index: int, token: int) -> None:
        del index  # one prompt
        self._write(self.stream.push(token))

    def close(self) -> None:
        self._write(self.stream.flush() + "\n")

    @staticmethod
    def _write(text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generate(job: _Job) -> tuple[list[list[int]], list[TimedAction]]:
    """One pipeline rank (or the only process at pp 1): load this stage, generate every prompt."""
    mesh = Mesh.build(job.pp, device_type=_device().type) if job.pp > 1 else None
    stage = 0 if mesh is None else mesh.pp_rank
    cfg = job.source.cfg
    partition = resolve_partition(cfg, job.pp)  # weights load by name: any split works
    blocks = build_stage(cfg, partition, stage, load=job.source.loader(), device=_device())
    _check_finite(blocks, job.source.weights)  # each rank its own blocks
    gen = generator_class(cfg)(blocks, cfg, mesh, timeout_s=job.timeout_s)
    gen.record = job.trace
    results: list[list[int]] = []
    timeline: list[TimedAction] = []
    if job.stream:
        printer = _Printer(_tokenizer(job.source), job) if stage == 0 else None
        results = gen.generate(job.prompt_ids, job.max_new_tokens, job.sampling,
                               microbatches=1, on_token=printer)
        if printer is not None:
            printer.close()
        return results, gen.timeline
    bar = tqdm(total=len(job.prompts), unit="prompt", dynamic_ncols=True, file=sys.stderr,
               disable=stage != 0)
    # prompts of like length go together: a batch pads every prompt to its longest
    order = sorted(range(len(job.prompt_ids)), key=lambda i: len(job.prompt_ids[i]))
    results = [[] for _ in order]
    t0 = time.perf_counter()
    for first in range(0, len(order), job.batch_size):
        wave = order[first:first + job.batch_size]
        offset = time.perf_counter() - t0  # each wave's timeline starts at its own 0
        new = gen.generate([job.prompt_ids[i] for i in wave], job.max_new_tokens, job.sampling,
                           microbatches=job.microbatches, on_done=lambda _i: bar.update())
        for i, tokens in zip(wave, new, strict=True):
            results[i] = tokens
        timeline += [replace(t, start=t.start + offset, end=t.end + offset,
                             ready=t.ready + offset) for t in gen.timeline]
    bar.close()
    return results, timeline


def _text_of(tokenizer: Tokenizer, cfg: ModelConfig) -> Callable[[Sequence[int]], str]:
    """How ids become text: an encoder-decoder's output loses its special tokens."""
    if not family_of(cfg).seq2seq:
        return tokenizer.decode
    return lambda ids: str(tokenizer.hf.decode(output_ids(ids, cfg), skip_special_tokens=True))


def _write_results(out: TextIO, job: _Job, results: list[list[int]], tokenizer: Tokenizer) -> None:
    seq2seq = family_of(job.source.cfg).seq2seq
    text = _text_of(tokenizer, job.source.cfg)
    for i, (prompt, ids, new) in enumerate(zip(job.prompts, job.prompt_ids, results, strict=True)):
        if seq2seq:
            record = {"index": i, "source": prompt, "output": text(new), "new_tokens": len(new)}
        else:
            completion = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]
            record = {"index": i, "prompt": prompt, "completion": completion,
                      "new_tokens": len(new)}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_sizes(args: argparse.Namespace, cfg: ModelConfig) -> None:
    if cfg.num_labels:
        raise ConfigError(f"this model is a classifier ({cfg.num_labels} labels), which has no "
                          "LM head to continue text with; label texts with `conveyor predict`")
    if not (family_of(cfg).generates or family_of(cfg).seq2seq):
        raise ConfigError(f"this model is family={cfg.family!r}, an encoder: it labels text "
                          "rather than generating it; use `conveyor predict --checkpoint ...`")
    positive(args.max_new_tokens, "--max-new-tokens")
    positive(args.timeout, "--timeout", integer=False)
    if not 1 <= args.pp <= cfg.num_blocks:
        raise ConfigError(f"--pp {args.pp} must be between 1 and {cfg.num_blocks} (the "
                          f"model's embedding + {cfg.n_layers} layers + head)")
    for name in ("batch_size", "microbatches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")


def _run(args: argparse.Namespace) -> int:
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    source = _open_source(args.checkpoint, args.tokenizer)
    cfg = source.cfg
    _check_sizes(args, cfg)
    prompts = [args.prompt] if args.prompts_file is None else read_prompts(args.prompts_file)
    tokenizer = _tokenizer(source)
    check_tokenizer_fits(tokenizer, source.tokenizer, cfg.vocab_size, _own_tokenizer(args.checkpoint))
    seq2seq = family_of(cfg).seq2seq
    # a source ends in eos as in training; its output stops at eos (the generator's default)
    ids = [check_prompt(source_ids(tokenizer.encode(p), cfg) if seq2seq else tokenizer.encode(p),
                        cfg) for p in prompts]
    stream = args.prompts_file is None and args.output is None
    job = _Job(source, prompts, ids, args.max_new_tokens,
               replace(sampling, eot_id=None if seq2seq else tokenizer.eot_id), args.pp,
               args.batch_size, args.microbatches, args.timeout, stream, args.trace is not None)
    if args.pp == 1:
        results, timeline = _generate(job)
        timelines = {0: timeline}
    else:
        out = launch(_generate, args.pp, job, backend=default_backend(), timeout_s=args.timeout)
        if 0 not in out:
            return 0  # another rank under torchrun: rank 0 reports
        results, timelines = out[0][0], {r: tl for r, (_, tl) in out.items()}
    if not stream:
        if args.output is None:
            _write_results(sys.stdout, job, results, tokenizer)
        else:
            with args.output.open("w", encoding="utf-8") as f:
                _write_results(f, job, results, tokenizer)
    if args.trace is not None:
        print(f"conveyor generate: wrote {write_chrome_trace({'generate': timelines}, args.trace)}",
              file=sys.stderr)
    # the decoder's positions: the prompt's and the new tokens, or an output's alone
    budgets = [context_budget(1 if seq2seq else len(i), args.max_new_tokens, cfg.max_seq_len)
               for i in ids]
    full = [n for n, (b, r) in enumerate(zip(budgets, results, strict=True))
            if b < args.max_new_tokens and len(r) == b]
    if full and len(prompts) == 1:
        what = "the decoder's start token" if seq2seq else f"the prompt's {len(ids[0])} tokens"
        print(f"conveyor generate: stopped after {budgets[0]} new tokens: {what} "
              f"and these fill max_seq_len={cfg.max_seq_len}",
              file=sys.stderr)
    elif full:
        print(f"conveyor generate: {len(full)} of {len(prompts)} prompts stopped early: their "
              f"tokens filled max_seq_len={cfg.max_seq_len}", file=sys.stderr)
    return 0
