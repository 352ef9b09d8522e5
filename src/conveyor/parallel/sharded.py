"""Shards of logical tensors: slicing, gathering, and the base of every tensor-parallel layer.

Every parameter of a tensor-parallel layer is a shard of a logical (unsharded)
tensor and carries ``tp_shard_dim`` (the dim it is split along, None when
replicated) and ``sequence_parallel`` (True when, under sequence parallelism, its
grad covers only this rank's tokens and must be summed over tp). Layers are built
*from* the logical tensors, so tp=1 and tp=N start bit-identical, and give them
back under the plain layer's names, for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from conveyor.parallel.collectives import Group, all_gather, all_reduce, tp_rank, tp_size

__all__ = [
    "TensorParallel",
    "padded_size",
    "shard",
    "gather_full",
    "mark_shard",
    "check_divides",
    "full_state_dict",
    "load_full_state_dict",
    "reduce_sequence_parallel_grads",
]


def padded_size(size: int, tp: int) -> int:
    """``size`` rounded up to a multiple of ``tp`` (a vocabulary split over tp ranks)."""
    return -(-size // tp) * tp


def shard(full: Tensor, shard_dim: int | None, group: Group) -> Tensor:
    """This rank's contiguous chunk of ``full`` along ``shard_dim`` (a copy; None: all of it)."""
    world = tp_size(group)
    if shard_dim is None or world == 1:
        return full.detach().clone()
    if full.shape[shard_dim] % world:
        raise ValueError(
            f"dim {shard_dim} of size {full.shape[shard_dim]} does not split over tp={world}; "
            f"make it a multiple of {world} (pad vocabularies, see padded_size)"
        )
    return full.detach().chunk(world, dim=shard_dim)[tp_rank(group)].clone()


def gather_full(param: Tensor, shard_dim: int | None, group: Group) -> Tensor:
    """The logical tensor whose shard ``param`` is (collective call on every tp rank)."""
    if shard_dim is None:
        return param.detach().clone()
    # a fresh buffer already: contiguous() copies only when the gather was not along dim 0
    return all_gather(param.detach(), shard_dim, group, "state").contiguous()


def mark_shard(
    param: Tensor | None, shard_dim: int | None, sequence_parallel: bool = False
) -> None:
    """Record how ``param`` is split (None: replicated) and whether its grad is partial (SP)."""
    if param is not None:
        param.tp_shard_dim = shard_dim  # type: ignore[attr-defined]
        # under SP a replicated param sees only this rank's tokens: its grad is partial
        partial = sequence_parallel and shard_dim is None
        param.sequence_parallel = partial  # type: ignore[attr-defined]


def check_divides(what: str, size: int, group: Group, fix: str) -> int:
    """The tp width, after checking that it divides ``size`` (ValueError naming both)."""
    world = tp_size(group)
    if size % world:
        raise ValueError(f"{what}={size} is not divisible by tp={world}; {fix}")
    return world


class TensorParallel(nn.Module):
    """A layer whose parameters are shards of logical tensors named as in the plain layer."""

    group: Group

    def _to_shard(self, name: str, full: Tensor) -> Tensor:
        return shard(full, getattr(self, name).tp_shard_dim, self.group)

    def _to_full(self, name: str, local: Tensor) -> Tensor:
        return gather_full(local, getattr(self, name).tp_shard_dim, self.group)

    def shard_of(self, name: str, full: Tensor) -> Tensor:
        """This rank's shard of ``full``, a logical tensor shaped like parameter ``name``."""
        return self._to_shard(name, full)

    def full_of(self, name: str, local: Tensor) -> Tensor:
        """The logical tensor of ``local``, shaped like parameter ``name`` (collective call)."""
        return self._to_full(name, local)

    def shard_parameters(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's shards of the logical tensors ``full``, by local name (no collective)."""
        names = [n for n, _ in self.named_parameters(recurse=False) if n in full]
        return {n: self._to_shard(n, full[n]) for n in names}

    def full_parameters(self) -> dict[str, Tensor]:
        """The logical tensors, by local name (collective call on every tp rank)."""
        return {n: self._to_full(n, p) for n, p in self.named_parameters(recurse=False)}

    def full_grads(self) -> dict[str, Tensor]:
        """The logical grads, by local name (collective call on every tp rank)."""
        params = self.named_parameters(recurse=False)
        return {n: self._to_full(n, p.grad) for n, p in params if p.grad is not None}

    def full_weight(self) -> Tensor:
        """The logical weight (collective call on every tp rank)."""
        return self.full_parameters()["weight"]

    def _adopt(self, full: Mapping[str, Tensor]) -> None:
        # replace the (meta) parameters by shards of ``full``, keeping their tp marks
        for name, local in self.shard_parameters(full).items():
            old = getattr(self, name)
            param = nn.Parameter(local, requires_grad=old.requires_grad)
            param.__dict__.update(old.__dict__)  # tp_shard_dim, sequence_parallel
            setattr(self, name, param)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every shard replaced by its logical tensor (collective)."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for prefix, m in module.named_modules():
        if isinstance(m, TensorParallel):
            for name, tensor in m.full_parameters().items():
                state[f"{prefix}.{name}" if prefix else name] = tensor
    return state


def load_full_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Load logical tensors (as ``full_state_dict`` gives) into a sharded ``module``."""
    local = dict(state)
    for prefix, m in module.named_modules():
        if isinstance(m, TensorParallel):
            dot = f"{prefix}." if prefix else ""
            full = {
                k[len(dot) :]: v
                for k, v in state.items()
                if k.startswith(dot) and "." not in k[len(dot) :]
            }
            local.update({dot + k: v for k, v in m.shard_parameters(full).items()})
    module.load_state_dict(local, strict=strict)


def reduce_sequence_parallel_grads(module: nn.Module, group: Group) -> None:
    """Sum over tp the grads of replicated params that saw only a sequence shard (SP).

    Call after backward (and after the weight-grad flush). Marks come from the layers
    here (row biases); mark others (norm gains) with ``param.sequence_parallel = True``.
    """
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            all_reduce(param.grad, group, "grad")
