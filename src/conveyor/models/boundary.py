"""What crosses a stage boundary: named tensors whose shapes are known before a step.

Every transfer between two pipeline stages is described up front by a *boundary
signature*: an ordered mapping from a name (``hidden``; later ``encoder_out``,
``attention_mask``) to its shape, dtype and whether a gradient flows back for it.
The receiver allocates from it, so no shape ever travels on the wire and every
backend (gloo, NCCL) sees only payloads, in an order both sides know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig

__all__ = ["Signature", "TensorSpec", "boundary_signature"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one boundary tensor, and whether its gradient flows back."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    grad: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes of one tensor of this spec."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def check(self, name: str, t: torch.Tensor, where: str) -> None:
        """Raise a ValueError naming ``where`` if ``t`` does not match this spec."""
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(
                f"{where} produced {name!r} of shape {tuple(t.shape)} and dtype {t.dtype}, but "
                f"the boundary signature says {self.shape} and {self.dtype}; a block changed "
                "the width or dtype of what crosses the stage boundary"
            )


Signature = dict[str, TensorSpec]
"""Boundary tensors by name, in the order they are sent."""


def boundary_signature(
    model: ModelConfig, batch: int, seq: int, after_block: int, *, tp: int = 1,
    sequence_parallel: bool = False,
) -> Signature:
    """The tensors crossing the cut after block ``after_block`` for a (batch, seq) microbatch.

    A decoder carries one residual stream, ``hidden``, in the parameters' dtype:
    under autocast the residual additions promote back to fp32, so the stream stays fp32.
    Under tensor parallelism each tp rank sends to its own peer of the next stage: the
    whole stream (replicated over tp), or with ``sequence_parallel`` its ``seq/tp``
    positions.
    """
    del after_block  # every cut of a decoder carries the same stream
    if sequence_parallel:
        if seq % tp:
            raise ValueError(f"sequence length {seq} does not split over tp={tp} under "
                             f"sequence parallelism; use a multiple of {tp}")
        seq //= tp
    return {"hidden": TensorSpec((batch, seq, model.d_model), torch.float32)}
