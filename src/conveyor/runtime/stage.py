"""One pipeline stage: run F, B and W of a microbatch and keep what backward needs.

Between stages the graph is cut: a stage's input is a fresh leaf tensor, so the
backward of a stage ends at its input's ``.grad``, which is what goes to the
previous stage. The last stage turns logits into the microbatch's share of the
step loss: its summed per-target losses over the target count of the whole global
batch (``denominators``, set by the pipeline before each step; see
``models.objective``), so the summed gradients equal those of the whole batch in one
process however many targets each microbatch holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..memory import ActivationMeter, count_saved_bytes, weight_storages
from ..models import EmbeddingBlock, HeadBlock
from ..models.linear import WeightGradStore, attach_weight_grad_store
from ..models.objective import normalise, target_counts

__all__ = ["StageRunner"]


class StageRunner:
    """Forward, backward and weight-grad of one stage's blocks, one microbatch at a time."""

    def __init__(
        self,
        stage: int,
        blocks: dict[int, nn.Module],
        *,
        num_microbatches: int,
        recompute: bool = False,
        split_backward: bool = False,
        autocast_dtype: torch.dtype | None = None,
        meter: ActivationMeter | None = None,
    ) -> None:
        self.stage = stage
        self.blocks = blocks  # global block index -> module, in order
        self.is_first = isinstance(next(iter(blocks.values())), EmbeddingBlock)
        self.is_last = isinstance(next(reversed(blocks.values())), HeadBlock)
        self.num_microbatches = num_microbatches
        self.recompute = recompute
        self.autocast_dtype = autocast_dtype
        self.device = next(next(iter(blocks.values())).parameters()).device
        # With split backward, linear layers hand their weight-grad work to this store
        # during B; W runs it later. Without, B computes everything.
        self.weight_store = WeightGradStore() if split_backward else None
        for block in blocks.values():
            attach_weight_grad_store(block, self.weight_store)
        self._stash: dict[int, tuple[Tensor | None, Tensor]] = {}
        self._saved: dict[int, int] = {}  # bytes autograd saved in each stashed forward
        # What a forward saves depends only on the input's shape: count it through
        # autograd's hooks once per shape, then reuse the number (the hooks cost time).
        self._saved_by_shape: dict[tuple[int, ...], int] = {}
        self._weights = weight_storages(blocks.values())
        self.losses: list[Tensor] = []
        # per loss term, what the last stage divides its sums by: the term's target count
        # over the global batch, per data-parallel replica. None: each microbatch's own
        # count times the microbatch count (right when every microbatch counts alike)
        self.denominators: dict[str, float] | None = None
        # stages of one rank share a meter: the rank's peak is not the sum of theirs
        self.meter = meter or ActivationMeter()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters under their single-process names, ``blocks.<index>.<name>``."""
        for idx, block in self.blocks.items():
            for name, p in block.named_parameters():
                yield f"blocks.{idx}.{name}", p

    def _run_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks.values():
            if self.recompute and not isinstance(block, (EmbeddingBlock, HeadBlock)):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(
        self, mb: int, inputs: Tensor | dict[str, Tensor], targets: Tensor | None, *,
        train: bool = True,
    ) -> dict[str, Tensor]:
        """Run the stage on microbatch ``mb``: the boundary tensors to send, or ``{"loss"}``.

        ``inputs`` are the token ids on the first stage, else the boundary tensors.
        """
        if isinstance(inputs, Tensor):
            x = inputs
        else:
            if set(inputs) != {"hidden"}:
                raise ValueError(f"stage {self.stage} expects boundary tensors ['hidden'], "
                                 f"got {sorted(inputs)}")
            x = inputs["hidden"]
            if train:
                x.requires_grad_(True)
        shape = tuple(x.shape)
        measure = train and shape not in self._saved_by_shape
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ), count_saved_bytes(self._weights) if measure else nullcontext() as saved:
            out = self._run_blocks(x)
            if self.is_last:
                assert targets is not None, "last stage needs targets"
                head = next(reversed(self.blocks.values()))
                assert isinstance(head, HeadBlock)
                # the head's own summed loss: plain or vocabulary-parallel cross-entropy
                out = normalise(head.loss(out, targets), self._denominators(targets))
        if self.is_last:
            self.losses.append(out.detach())
        if train:
            if saved is not None:
                self._saved_by_shape[shape] = saved.total
            self._stash[mb] = (None if self.is_first else x, out)
            self._saved[mb] = self._saved_by_shape[shape]
            self.meter.add(self._saved[mb])
        return {"loss" if self.is_last else "hidden": out.detach()}

    def _denominators(self, targets: Tensor) -> dict[str, float]:
        if self.denominators is not None:
            return self.denominators
        m = self.num_microbatches
        return {k: max(c, 1) * m for k, c in target_counts(targets).items()}

    def backward(
        self, mb: int, grads: dict[str, Tensor] | None, *, defer_weights: bool = False
    ) -> dict[str, Tensor] | None:
        """Backward of microbatch ``mb`` given its outputs' grads; returns its inputs' grads.

        A full backward (B) computes the weight-grads too; with ``defer_weights`` (I) the
        linear layers file theirs for :meth:`weight` (W), and the activations they need
        stay counted until then.
        """
        x, out = self._stash.pop(mb)
        grad = None if self.is_last or grads is None else grads["hidden"]
        if defer_weights:
            if self.weight_store is None:
                raise RuntimeError(f"stage {self.stage} runs an I action but was built without "
                                   "split backward; build it with split_backward=True")
            with self.weight_store.collect(mb):
                torch.autograd.backward(out, grad)
        else:
            self.meter.release(self._saved.pop(mb))
            torch.autograd.backward(out, grad)
        if x is None:
            return None
        assert x.grad is not None
        return {"hidden": x.grad}

    def reset(self) -> None:
        """Forget everything a (failed) step left: stashed graphs, losses, deferred W work."""
        self._stash.clear()
        self._saved.clear()
        self.losses = []
        if self.weight_store is not None:
            self.weight_store.clear()

    def weight(self, mb: int) -> None:
        """Weight-grad of microbatch ``mb`` (work deferred by its B)."""
        if self.weight_store is None:
            raise RuntimeError(f"stage {self.stage} runs a W action but was built without "
                               "split backward; build it with split_backward=True")
        self.weight_store.flush(mb)
        # what B freed and what W frees are not told apart: count the whole at W, as
        # the simulator does
        self.meter.release(self._saved.pop(mb))

    def take_losses(self) -> list[Tensor]:
        """The per-microbatch losses recorded since the last call (last stage only)."""
        out, self.losses = self.losses, []
        return out

