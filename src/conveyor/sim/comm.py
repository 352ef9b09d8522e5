"""Collectives of tensor and data parallelism: what is sent, over which link, how long.

Ring algorithms on ``n`` ranks (what NCCL and gloo use for large messages): an
all-reduce of ``S`` bytes moves ``2 (n-1)/n S`` bytes through each rank's link in
``2 (n-1)`` steps; an all-gather or reduce-scatter (``S`` = the full tensor) moves
``(n-1)/n S`` in ``n-1`` steps. Each step pays the link's latency.

Which link an axis uses follows the mesh order (``parallel.mesh``: global rank =
``(pp_index * dp + dp_index) * tp + tp_index``, tp innermost): a group whose ranks
all sit on one node (its span of consecutive ranks fits ``gpus_per_node``) runs on
the intra-node link, any other on the inter-node one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Collective",
    "Link",
    "MeshLinks",
    "collective_time",
    "dp_grad_collectives",
    "head_collectives",
    "embedding_collectives",
    "layer_collectives",
]

Op = Literal["all-reduce", "all-gather", "reduce-scatter"]


@dataclass(frozen=True)
class Link:
    """Bandwidth (bytes/s each way, per rank) and per-message latency of one link kind."""

    bandwidth_Bps: float
    latency_s: float
    ops: tuple[tuple[str, float, float], ...] = ()
    """Measured (op, per-step latency, bandwidth) of single collectives on this link, which
    replace the two above for that op (``sim.gloo``: gloo's collectives are not one rate)."""


@dataclass(frozen=True)
class Collective:
    """One collective over a group: its kind and the bytes of the full tensor."""

    op: Op
    nbytes: float


def collective_time(c: Collective, n: int, link: Link) -> float:
    """Seconds of a ring collective ``c`` over ``n`` ranks on ``link`` (0 when n == 1)."""
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if c.op == "all-reduce" else n - 1
    latency, bandwidth = next(((lat, bw) for op, lat, bw in link.ops if op == c.op),
                              (link.latency_s, link.bandwidth_Bps))
    return steps * (latency + c.nbytes / n / bandwidth)


@dataclass(frozen=True)
class MeshLinks:
    """The link each axis of a pp x dp x tp mesh runs on, tp innermost."""

    tp: Link
    dp: Link
    pp: Link

    @classmethod
    def build(
        cls, *, tp: int, dp: int, pp: int, gpus_per_node: int, intra: Link, inter: Link
    ) -> MeshLinks:
        """Intra-node where the axis's span of consecutive ranks fits on one node."""
        def pick(span: int) -> Link:
            return intra if span <= gpus_per_node else inter

        # a tp group spans tp ranks, a dp group tp*dp; the pipeline's slowest pair decides,
        # and some pair crosses a node unless the whole mesh fits on one
        return cls(tp=pick(tp), dp=pick(tp * dp), pp=pick(tp * dp * pp))


def layer_collectives(
    tokens: int, d_model: int, *, sequence_parallel: bool, dtype_bytes: int
) -> tuple[tuple[Collective, ...], tuple[Collective, ...]]:
    """Tensor-parallel collectives of one transformer block: (forward, backward).

    Without sequence parallelism: the row-parallel outputs of attention and MLP are
    all-reduced in forward, the column-parallel inputs' grads in backward (2 + 2).
    With it, each all-reduce becomes an all-gather on entering a column layer and a
    reduce-scatter on leaving a row layer, and backward does the transposes
    (2 all-gathers + 2 reduce-scatters each way): the same bytes on the wire.
    """
    hidden = float(tokens * d_model * dtype_bytes)
    if not sequence_parallel:
        two = (Collective("all-reduce", hidden),) * 2
        return two, two
    pairs = (Collective("all-gather", hidden), Collective("reduce-scatter", hidden)) * 2
    return pairs, pairs


def embedding_collectives(
    tokens: int, d_model: int, *, sequence_parallel: bool, dtype_bytes: int
) -> tuple[tuple[Collective, ...], tuple[Collective, ...]]:
    """Vocabulary-parallel embedding: its lookup is summed over tp (reduce-scattered under SP)."""
    hidden = float(tokens * d_model * dtype_bytes)
    if sequence_parallel:
        return (Collective("reduce-scatter", hidden),), (Collective("all-gather", hidden),)
    return (Collective("all-reduce", hidden),), ()


def head_collectives(
    tokens: int, d_model: int, *, sequence_parallel: bool, dtype_bytes: int
) -> tuple[tuple[Collective, ...], tuple[Collective, ...]]:
    """Column-parallel head and vocabulary-parallel loss.

    The loss reduces three fp32 numbers per token in forward (max, target logit,
    sum of exponentials); the head's input is all-gathered under SP, and its grad
    all-reduced (reduce-scattered under SP) in backward.
    """
    hidden = float(tokens * d_model * dtype_bytes)
    loss = (Collective("all-reduce", 4.0 * tokens),) * 3
    if sequence_parallel:
        return (Collective("all-gather", hidden), *loss), (Collective("reduce-scatter", hidden),)
    return loss, (Collective("all-reduce", hidden),)


def dp_grad_collectives(
    grad_bytes: float, *, bucket_bytes: float, zero: int, param_bytes: float
) -> tuple[tuple[tuple[Collective, int], ...], tuple[Collective, ...]]:
    """A stage's data-parallel gradient reduction: ((bucket, how many), ...) in backward,
    and the collectives after the optimizer.

    Buckets of ``bucket_bytes`` (0: one collective for all) are all-reduced, or under
    ZeRO-1 reduce-scattered, as backward completes them; ZeRO-1 then all-gathers the
    updated parameters after the optimizer step, which nothing overlaps.
    """
    if grad_bytes <= 0:
        return (), ()
    size = bucket_bytes if 0 < bucket_bytes < grad_bytes else grad_bytes
    full, rest = divmod(grad_bytes, size)
    op: Op = "reduce-scatter" if zero else "all-reduce"
    buckets = ((Collective(op, size), int(full)),) + (((Collective(op, rest), 1),) if rest else ())
    after = (Collective("all-gather", param_bytes),) if zero else ()
    return buckets, after
