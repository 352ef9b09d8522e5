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

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..memory import ActivationMeter, count_saved_bytes, weight_storages
from ..models.attention import MaskedAttention
from ..models.layers import Attention
from ..models.linear import WeightGradStore, attach_weight_grad_store
from ..models.objective import Targets, normalise, target_counts

__all__ = ["StageRunner"]


class StageRunner:
    """Forward, backward and weight-grad of one stage's blocks, one microbatch at a time."""

    def __init__(
        self,
        stage: int,
        blocks: dict[int, nn.Module],
        *,
        num_microbatches: int,
        recompute: bool | str = False,
        compile: bool = False,
        split_backward: bool = False,
        autocast_dtype: torch.dtype | None = None,
        meter: ActivationMeter | None = None,
    ) -> None:
        self.stage = stage
        self.blocks = blocks  # global block index -> module, in order
        # roles come from the blocks (see models.family), never from their classes
        first, last = next(iter(blocks.values())), next(reversed(blocks.values()))
        self.is_first = getattr(first, "role", None) == "embedding"
        self.is_last = getattr(last, "role", None) == "head"
        # named blocks take the boundary's dict; tensor blocks its one tensor, ``hidden``
        self.named_io = bool(getattr(first, "named_io", False))
        self.num_microbatches = num_microbatches
        # True: each transformer block is checkpointed; "selective": only attention cores
        self.recompute = recompute
        for block in blocks.values():
            for module in block.modules():
                if isinstance(module, (Attention, MaskedAttention)):
                    module.recompute_core = recompute == "selective"
        self.autocast_dtype = autocast_dtype
        self.device = next(next(iter(blocks.values())).parameters()).device
        # With split backward, linear layers hand their weight-grad work to this store
        # during B; W runs it later. Without, B computes everything.
        self.weight_store = WeightGradStore() if split_backward else None
        for block in blocks.values():
            attach_weight_grad_store(block, self.weight_store)
            if compile:
                # in place, so parameter names stay those of the single-process model; the
                # deferring linears' autograd Function traces with its weight-grad closure
                # intact, so split backward (I then W) keeps working compiled
                block.compile()
        self._stash: dict[int, tuple[Tensor | None, Tensor]] = {}
        self._saved: dict[int, int] = {}  # bytes autograd saved in each stashed forward
        # What a forward saves depends only on the input's shape: count it through
        # autograd's hooks once per shape, then reuse the number (the hooks cost time).
        self._saved_by_shape: dict[tuple[Any, ...], int] = {}
        self._weights = weight_storages(blocks.values())
        self.losses: list[Tensor] = []
        # the head's outputs of forward-only microbatches given no targets (predict_step)
        self.outputs: dict[int, Any] = {}
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

    def _run_blocks(self, x: Any) -> Any:
        for block in self.blocks.values():
            if self.recompute is True and getattr(block, "role", None) == "layer":
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _autocast(self) -> AbstractContextManager[Any]:
        # a disabled torch.autocast still costs its checks on every forward: skip it
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _stage_input(self, inputs: Any, train: bool) -> Any:
        """The first block's argument: the data on the first stage, else the received tensors.

        Received float tensors become leaves that collect their grads (what goes back).
        """
        if self.is_first:
            return inputs
        if not self.named_io and set(inputs) != {"hidden"}:
            raise ValueError(f"stage {self.stage} expects boundary tensors ['hidden'], "
                             f"got {sorted(inputs)}")
        if train:
            for t in inputs.values():
                if t.is_floating_point():
                    t.requires_grad_(True)
        return dict(inputs) if self.named_io else inputs["hidden"]

    def forward(
        self, mb: int, inputs: Any, targets: Targets | None, *, train: bool = True,
    ) -> dict[str, Tensor]:
        """Run the stage on microbatch ``mb``: the boundary tensors to send, or ``{"loss"}``.

        ``inputs`` are the microbatch's data on the first stage (a decoder's token ids,
        a dict of named inputs for other families), else the boundary tensors.
        """
        x = self._stage_input(inputs, train)
        shape = _shape_key(x)
        measure = train and shape not in self._saved_by_shape
        with self._autocast(), count_saved_bytes(self._weights) if measure else nullcontext() as saved:
            out = self._run_blocks(x)
            if self.is_last and targets is None:  # prediction: keep the head's outputs
                assert not train, "training needs targets on the last stage"
                self.outputs[mb] = out
                return {}
            if self.is_last:
                head = next(reversed(self.blocks.values()))
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
        if self.is_last:
            return {"loss": out.detach()}
        if isinstance(out, Mapping):
            return {k: t.detach() for k, t in out.items()}
        return {"hidden": out.detach()}

    def _denominators(self, targets: Targets) -> dict[str, float]:
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
        outs, grad_outs = _backward_pairs(out, None if self.is_last else grads)
        if defer_weights:
            if self.weight_store is None:
                raise RuntimeError(f"stage {self.stage} runs an I action but was built without "
                                   "split backward; build it with split_backward=True")
            with self.weight_store.collect(mb):
                torch.autograd.backward(outs, grad_outs)
        else:
            self.meter.release(self._saved.pop(mb))
            torch.autograd.backward(outs, grad_outs)
        if x is None:
            return None
        if isinstance(x, Tensor):
            assert x.grad is not None
            return {"hidden": x.grad}
        # a received tensor no block of this stage used still owes its sender a grad: zero
        return {k: t.grad if t.grad is not None else torch.zeros_like(t)
                for k, t in x.items() if t.is_floating_point()}

    def reset(self) -> None:
        """Forget everything a (failed) step left: stashed graphs, losses, deferred W work."""
        self._stash.clear()
        self._saved.clear()
        self.losses = []
        self.outputs = {}
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



def _shape_key(x: Any) -> tuple[Any, ...]:
    """What a forward's saved bytes depend on: its input shapes."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    return tuple(sorted((k, tuple(t.shape)) for k, t in x.items()))


def _backward_pairs(
    out: Any, grads: Mapping[str, Tensor] | None
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The outputs to run backward from and their grads: the loss, or each boundary tensor.

    A boundary tensor passed through unchanged is the received leaf itself: the grad
    from downstream lands in it beside those of this stage's own uses (a decoder
    stage's cross-attentions add theirs to ``encoder_out``'s), and the sum goes back.
    """
    if grads is None:
        return [out], [None]
    if isinstance(out, Tensor):
        return [out], [grads["hidden"]]
    pairs = [(out[k], g) for k, g in grads.items() if out[k].requires_grad]
    return [t for t, _ in pairs], [g for _, g in pairs]
