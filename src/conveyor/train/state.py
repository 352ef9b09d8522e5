"""A rank's training state as checkpoint tensors and back, by single-process names.

Parameters are saved under the names the single-process model uses and AdamW's
state as ``optim.<name>.<key>``, so a checkpoint loads into any pipeline layout:
each rank asks for the names of the blocks it holds. The head's copy of a tied
embedding split across ranks is not saved (it equals the embedding's); on load,
the checkpoint module hands it the embedding's tensors under its own name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..runtime.pipeline import Pipeline
from .checkpoint import load_tensors
from .optim import load_optimizer_state, optimizer_state, optimizer_state_names

__all__ = ["unique_params", "state_tensors", "load_params", "load_training_state",
           "rank_meta", "restore_rank_meta"]


def unique_params(pipe: Pipeline) -> list[tuple[str, nn.Parameter]]:
    """This rank's parameters by name, without the head's copy of a split tied embedding."""
    dup = pipe.tied_duplicate()
    return [(n, p) for n, p in pipe.named_parameters() if p is not dup]


def state_tensors(pipe: Pipeline, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Parameters and AdamW state of this rank, as the tensors of a checkpoint."""
    named = unique_params(pipe)
    tensors: dict[str, Tensor] = {name: p.detach() for name, p in named}
    tensors.update(optimizer_state(optimizer, named))
    return tensors


@torch.no_grad()
def load_params(pipe: Pipeline, ckpt: Path) -> None:
    """Copy every parameter this rank holds from checkpoint ``ckpt``."""
    named = list(pipe.named_parameters())
    tensors = load_tensors(ckpt, [n for n, _ in named])
    for name, p in named:
        p.copy_(tensors[name])


@torch.no_grad()
def load_training_state(pipe: Pipeline, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Parameters and AdamW state of this rank from ``ckpt``, saved with any layout."""
    named = list(pipe.named_parameters())
    names = [n for n, _ in named] + optimizer_state_names(named)
    tensors = load_tensors(ckpt, names)
    for name, p in named:
        p.copy_(tensors[name])
    load_optimizer_state(optimizer, named, tensors)


def rank_meta(elapsed_s: float) -> dict[str, Any]:
    """This rank's entry of ``meta["ranks"]``: its torch RNG state and wall time so far."""
    return {"rng": torch.get_rng_state().tolist(), "elapsed_s": elapsed_s}


def restore_rank_meta(meta: dict[str, Any]) -> float:
    """Restore this rank's RNG state from a checkpoint's meta (rank 0's when it had fewer
    ranks); return the elapsed wall time it recorded."""
    ranks = meta.get("ranks", {})
    rank = str(dist.get_rank()) if dist.is_initialized() else "0"
    entry = ranks.get(rank) or ranks.get("0") or {}
    if "rng" in entry:
        torch.set_rng_state(torch.tensor(entry["rng"], dtype=torch.uint8))
    return float(entry.get("elapsed_s", 0.0))
