"""``conveyor generate``: continue a prompt with a trained or exported model, streaming text.

``--checkpoint`` takes a checkpoint directory, a run directory (its latest
checkpoint) or an exported model directory (config.json + model.safetensors).
With ``--pp 1`` the model runs in this process; with more, one pipeline stage per
spawned rank, each loading only its own blocks. The prompt is printed, then each
new piece of text as soon as it is complete. Generation stops after
``--max-new-tokens``, at the end-of-text token, or when the model's
``max_seq_len`` positions are full (a note on stderr says so).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, ModelConfig
from ..data.tokenizer import Tokenizer, check_tokenizer_fits, load_tokenizer
from ..generation import TextStream, check_prompt, check_sampling, context_budget, generate
from ..models import Transformer
from ..parallel.layout import resolve_partition
from ..parallel.mesh import Mesh
from ..runtime.generate import build_stage, generate_pipelined, load_block_weights
from ..runtime.launch import default_backend, launch
from ..train.checkpoint import CheckpointError, load_tensors, read_meta, resolve_checkpoint
from ..train.checkpoint_files import checkpoint_tokenizer
from ..train.export import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    load_exported,
    model_config_from,
    read_exported_config,
)
from .checks import positive

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``generate`` to the CLI."""
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained or exported model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint dir, run dir (latest checkpoint) or exported model dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 always picks the most likely token")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="sample among the most likely tokens holding this mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks to split the model over")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to use instead of the one the checkpoint names")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a pipeline rank waits for a peer before giving up")
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
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    eot_id: int
    pp: int
    timeout_s: float


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


def _check_finite(model: torch.nn.Module, where: Path) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{where}: weights are not finite (NaN or inf) in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; the run "
                              "diverged: generate from an earlier checkpoint")


def _tokenizer(source: _Source) -> Tokenizer:
    if source.tokenizer is None:
        raise CheckpointError("the checkpoint names no tokenizer; pass --tokenizer "
                              "PATH/tokenizer.json (the one the model was trained with)")
    return load_tokenizer(source.tokenizer)


class _Printer:
    """Writes the prompt, then each completed piece of text, to stdout at once."""

    def __init__(self, tokenizer: Tokenizer, prompt: str, prompt_ids: list[int]) -> None:
        self.stream = TextStream(tokenizer.decode, prompt_ids)
        self.prompt = prompt

    def start(self) -> None:
        self._write(self.prompt)

    def __call__(self, token: int) -> None:
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


def _sampling(job: _Job) -> dict[str, Any]:
    return dict(temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=job.seed,
                stop_at_eot=True, eot_id=job.eot_id)


def _single(job: _Job, tokenizer: Tokenizer) -> list[int]:
    src = job.source
    if src.exported:
        model, _ = load_exported(src.weights.parent)
    else:
        model = Transformer(src.cfg, seed=0)
        load_block_weights(src.cfg, dict(enumerate(model.blocks)), src.loader())
    _check_finite(model, src.weights)
    model = model.to(_device()).eval()
    printer = _Printer(tokenizer, job.prompt, job.prompt_ids)
    printer.start()
    tokens = generate(model, job.prompt_ids, job.max_new_tokens, on_token=printer,
                      **_sampling(job))
    printer.close()
    return tokens


def _rank(job: _Job) -> list[int]:
    """One pipeline rank: build and load this stage's blocks, then generate."""
    mesh = Mesh.build(job.pp, device_type=_device().type)
    cfg = job.source.cfg
    partition = resolve_partition(cfg, job.pp)  # weights load by name: any split works
    blocks = build_stage(cfg, partition, mesh.pp_rank, load=job.source.loader(), device=_device())
    printer = None
    if mesh.pp_rank == 0:
        printer = _Printer(_tokenizer(job.source), job.prompt, job.prompt_ids)
        printer.start()
    tokens = generate_pipelined(blocks, cfg, mesh, job.prompt_ids, job.max_new_tokens,
                                on_token=printer, timeout_s=job.timeout_s, **_sampling(job))
    if printer is not None:
        printer.close()
    return tokens


def _run(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p)
    positive(args.max_new_tokens, "--max-new-tokens")
    positive(args.timeout, "--timeout", integer=False)
    source = _open_source(args.checkpoint, args.tokenizer)
    cfg = source.cfg
    if not 1 <= args.pp <= cfg.num_blocks:
        raise ConfigError(f"--pp {args.pp} must be between 1 and {cfg.num_blocks} (the "
                          f"model's embedding + {cfg.n_layers} layers + head)")
    tokenizer = _tokenizer(source)
    check_tokenizer_fits(tokenizer, source.tokenizer, cfg.vocab_size, _own_tokenizer(args.checkpoint))
    prompt_ids = check_prompt(tokenizer.encode(args.prompt), cfg)
    budget = context_budget(len(prompt_ids), args.max_new_tokens, cfg.max_seq_len)
    job = _Job(source, args.prompt, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
               args.top_p, args.seed, tokenizer.eot_id, args.pp, args.timeout)
    if args.pp == 1:
        tokens: list[int] | None = _single(job, tokenizer)
    else:
        results = launch(_rank, args.pp, job, backend=default_backend(), timeout_s=args.timeout)
        tokens = results.get(0)  # None on the other ranks under torchrun
    if tokens is not None and budget < args.max_new_tokens and len(tokens) == budget:
        print(f"conveyor generate: stopped after {budget} new tokens: the prompt's "
              f"{len(prompt_ids)} tokens and these fill max_seq_len={cfg.max_seq_len}",
              file=sys.stderr)
    return 0
