"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine LR schedule.

The schedule is a pure function of the step, so a resumed run needs no scheduler
state: step ``s`` gets ``lr_at(s, ...)`` whether or not the run stopped before it::

    lr  ^     ___
        |   /     ` .
        |  /          ` .
        | /               ` . ______ min_lr
        +--+------------------------+--> step
          warmup                  steps
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "BETAS",
    "STATE_KEYS",
    "build_optimizer",
    "load_optimizer_state",
    "lr_at",
    "optimizer_state",
    "optimizer_state_names",
    "set_lr",
]

BETAS = (0.9, 0.95)
"""AdamW's moment decay rates (GPT-2/3 practice for language models)."""
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
"""What AdamW keeps per parameter, saved in checkpoints as ``optim.<param>.<key>``."""


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine down to min_lr.

    Warmup climbs as ``lr * (step + 1) / warmup`` so that the first update already moves;
    the cosine runs from ``lr`` at ``step = warmup`` to ``min_lr`` at ``step = total - 1``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = total - 1 - warmup
    if span <= 0:
        return lr
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
    ndims: Mapping[str, int] | None = None,
) -> torch.optim.AdamW:
    """AdamW over two groups: matrices decay, norms and biases (ndim < 2) do not.

    ``ndims`` gives a parameter's own ndim by name where the leaf is flat (ZeRO-1 chunks).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named_params:
        ndim = p.ndim if ndims is None else ndims[name]
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch's fused kernel updates every tensor in one pass (4x faster than foreach on
    # CPU: 10 ms against 41 for 8.7M parameters here); it takes float tensors on one
    # device type that it supports
    params = decay + no_decay
    devices = {p.device.type for p in params}
    fused = (len(devices) == 1 and devices <= {"cpu", "cuda"}
             and all(p.dtype in _FUSED_DTYPES for p in params))
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=1e-8, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` in every parameter group from the next ``step()`` on."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_state(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]]
) -> dict[str, Tensor]:
    """Each parameter's AdamW state as ``{"optim.<name>.<key>": tensor}`` (empty before step 1)."""
    out: dict[str, Tensor] = {}
    for name, p in named_params:
        state = optimizer.state.get(p, {})
        for key in STATE_KEYS:
            if key in state:
                out[f"optim.{name}.{key}"] = state[key]
    return out


def optimizer_state_names(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    """The checkpoint names ``load_optimizer_state`` needs for these parameters."""
    return [f"optim.{name}.{key}" for name, _ in named_params for key in STATE_KEYS]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Iterable[tuple[str, nn.Parameter]],
    tensors: dict[str, Tensor],
) -> None:
    """Put saved AdamW state (by parameter name, so from any layout) back in the optimizer."""
    for name, p in named_params:
        step = tensors[f"optim.{name}.step"]
        optimizer.state[p] = {
            # a CPU float32 scalar, as AdamW keeps it when not capturable or fused
            "step": step.detach().to(device="cpu", dtype=torch.float32).clone(),
            "exp_avg": tensors[f"optim.{name}.exp_avg"].to(p.device, p.dtype).clone(),
            "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(p.device, p.dtype).clone(),
        }
