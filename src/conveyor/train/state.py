"""A rank's training state as checkpoint tensors and back, by single-process names.

Parameters are saved under the names the single-process model uses and AdamW's
state as ``optim.<name>.<key>``, so a checkpoint loads into any pipeline layout:
each rank asks for the names of the blocks it holds. The head's copy of a tied
embedding split across ranks is not saved (it equals the embedding's); on load,
the checkpoint module hands it the embedding's tensors under its own name.

Under tensor parallelism the saved tensors are the logical (unsharded) ones: the
shards of parameters and of their AdamW moments are gathered over tp (vocabulary
padding dropped) and written once, by tp rank 0; a load slices every rank's part
again. So a checkpoint of any (pp, dp, tp) layout resumes under any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parallel.zero import ZeroShards
from ..runtime.generate import weight_sources
from ..runtime.pipeline import Pipeline
from .checkpoint import CheckpointError, load_tensors
from .optim import STATE_KEYS, load_optimizer_state, optimizer_state, optimizer_state_names
from .rng import capture_rng, restore_rng

__all__ = ["unique_params", "state_tensors", "load_params", "load_model_params",
           "load_fitting_params", "load_training_state",
           "rank_meta", "restore_rank_meta"]


def unique_params(pipe: Pipeline) -> list[tuple[str, nn.Parameter]]:
    """This rank's parameters by name, without the head's copy of a split tied embedding."""
    dup = pipe.tied_duplicate()
    return [(n, p) for n, p in pipe.named_parameters() if p is not dup]


# AdamW's per-element state, sharded like its parameter ("step" is one scalar)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_state(zero: ZeroShards, optimizer: torch.optim.Optimizer,
                named: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """ZeRO-1 chunks' state gathered over dp into per-parameter checkpoint tensors."""
    keep = {name for name, _ in named}
    return {f"optim.{name}.{key}": t
            for name, state in zero.full_state(optimizer, STATE_KEYS).items() if name in keep
            for key, t in state.items()}


def state_tensors(pipe: Pipeline, optimizer: torch.optim.Optimizer,
                  zero: ZeroShards | None = None) -> dict[str, Tensor]:
    """Parameters and AdamW state of this rank, logical (unsharded), as checkpoint tensors.

    Collective over the tp group (and, with ZeRO-1 ``zero``, over dp); under tp only
    tp rank 0 returns them (the other tp ranks hold the same logical tensors).
    """
    named = unique_params(pipe)
    tensors: dict[str, Tensor] = {name: pipe.to_full(name, p) for name, p in named}
    state = (optimizer_state(optimizer, named) if zero is None
             else _zero_state(zero, optimizer, named))
    for name, _ in named:  # the same names, in the same order, on every tp rank
        for key in _MOMENTS:
            full_key = f"optim.{name}.{key}"
            if full_key in state:
                state[full_key] = pipe.to_full(name, state[full_key])
    tensors.update(state)
    return tensors if pipe.mesh.tp_rank == 0 else {}


def _load_shards(pipe: Pipeline, ckpt: Path, names: list[str]) -> dict[str, Tensor]:
    """The named tensors of ``ckpt``, each sliced to this tp rank's part of its parameter."""
    return _to_shards(pipe, load_tensors(ckpt, names), f"checkpoint {ckpt}")


def _to_shards(pipe: Pipeline, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """``tensors`` (logical, by name) with each parameter's sliced to this tp rank's part."""
    for name, p in pipe.named_parameters():
        for key in (name, *(f"optim.{name}.{m}" for m in _MOMENTS)):
            if key in tensors:
                tensors[key] = pipe.to_shard(name, tensors[key])
                if tensors[key].shape != p.shape:
                    raise CheckpointError(
                        f"{where}: {key} has shape {tuple(tensors[key].shape)} for a "
                        f"parameter of shape {tuple(p.shape)} here; resume with the model "
                        "config the checkpoint was saved with"
                    )
    return tensors


@torch.no_grad()
def load_params(pipe: Pipeline, ckpt: Path) -> None:
    """Copy every parameter this rank holds (its tp shard) from checkpoint ``ckpt``."""
    named = list(pipe.named_parameters())
    tensors = _load_shards(pipe, ckpt, [n for n, _ in named])
    for name, p in named:
        p.copy_(tensors[name])


@torch.no_grad()
def load_training_state(pipe: Pipeline, optimizer: torch.optim.Optimizer, ckpt: Path,
                        zero: ZeroShards | None = None) -> None:
    """Parameters and AdamW state of this rank from ``ckpt``, saved with any layout."""
    named = list(pipe.named_parameters())
    names = [n for n, _ in named] + optimizer_state_names(named)
    tensors = _load_shards(pipe, ckpt, names)
    for name, p in named:
        p.copy_(tensors[name])
    if zero is None:
        load_optimizer_state(optimizer, named, tensors)
        return
    zero.sync_from_params()  # the chunks the optimizer steps start from the loaded values
    zero.load_state(optimizer, {name: {k: tensors[f"optim.{name}.{k}"] for k in STATE_KEYS}
                                for name, _ in named})


@torch.no_grad()
def load_model_params(pipe: Pipeline, tensors: Mapping[str, Tensor], where: str) -> None:
    """Copy every parameter this rank holds (its tp shard) from a whole model's tensors
    (an export's: a tied head is found under the embedding's name)."""
    sources: dict[str, str] = {}
    for stage in pipe.stages.values():
        sources.update(weight_sources(pipe.model_cfg, stage.blocks))
    named = list(pipe.named_parameters())
    picked = {name: tensors[sources.get(name, name)] for name, _ in named}
    shards = _to_shards(pipe, picked, where)
    for name, p in named:
        p.copy_(shards[name])


@torch.no_grad()
def load_fitting_params(pipe: Pipeline, tensors: Mapping[str, Tensor],
                        shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Copy the parameters this rank holds that ``tensors`` has with the logical shape
    ``shapes`` gives; the others (a new head) keep their initialisation."""
    sources: dict[str, str] = {}
    for stage in pipe.stages.values():
        sources.update(weight_sources(pipe.model_cfg, stage.blocks))
    named = [(n, p) for n, p in pipe.named_parameters()
             if sources.get(n, n) in tensors
             and tuple(tensors[sources.get(n, n)].shape) == tuple(shapes[n])]
    shards = _to_shards(pipe, {n: tensors[sources.get(n, n)] for n, _ in named}, where)
    for name, p in named:
        p.copy_(shards[name])


def rank_meta(elapsed_s: float) -> dict[str, Any]:
    """This rank's entry of ``meta["ranks"]``: its RNG states and wall time so far."""
    return {"rng_all": capture_rng(), "elapsed_s": elapsed_s}


def restore_rank_meta(meta: dict[str, Any]) -> float:
    """Restore this rank's RNG state from a checkpoint's meta (rank 0's when it had fewer
    ranks); return the elapsed wall time it recorded."""
    ranks = meta.get("ranks", {})
    rank = str(dist.get_rank()) if dist.is_initialized() else "0"
    entry = ranks.get(rank) or ranks.get("0") or {}
    if "rng_all" in entry:
        restore_rng(entry["rng_all"])
    elif "rng" in entry:  # older checkpoints saved torch's CPU generator alone
        torch.set_rng_state(torch.tensor(entry["rng"], dtype=torch.uint8))
    return float(entry.get("elapsed_s", 0.0))
