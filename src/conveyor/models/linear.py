"""A linear layer whose weight-grad can be deferred: the basis of split backward (B / W).

Zero-bubble schedules run a stage's backward in two actions: B computes only the
grad of the input (what the previous stage waits for) and W, later, the grads of
the weights (which nobody waits for). Nearly all of a transformer's weight-grad
work is in its linear layers, so those layers hand that work to a
:class:`WeightGradStore` during B instead of doing it; W runs it. Norm and
embedding weights keep their (cheap) grads in B. Without a store the layer is
exactly ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "WeightGradStore", "attach_weight_grad_store", "linear"]


class WeightGradStore:
    """Weight-grad work deferred during B, kept per microbatch until its W."""

    def __init__(self) -> None:
        self._pending: dict[int, list[Callable[[], None]]] = {}
        self._current: int | None = None

    @contextmanager
    def collect(self, microbatch: int) -> Iterator[None]:
        """Within this block, deferred work is filed under ``microbatch``."""
        self._current = microbatch
        self._pending.setdefault(microbatch, [])
        try:
            yield
        finally:
            self._current = None

    def defer(self, work: Callable[[], None]) -> None:
        """File ``work`` for the current microbatch (run at once outside ``collect``)."""
        if self._current is None:
            work()
        else:
            self._pending[self._current].append(work)

    def flush(self, microbatch: int) -> None:
        """Run the deferred work of ``microbatch``."""
        # outside autograd's backward, grad mode is on again: the weight grads must not
        # record a graph of their own
        with torch.no_grad():
            for work in self._pending.pop(microbatch, []):
                work()

    def clear(self) -> None:
        """Drop all deferred work (a failed step is abandoned)."""
        self._pending.clear()
        self._current = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._pending.values())


def _accumulate(param: Tensor, grad: Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _accumulate_matmul(param: Tensor, a: Tensor, b: Tensor) -> None:
    """``param.grad += a @ b``, in place once a grad exists (no temporary the size of W)."""
    if param.grad is None or a.dtype != param.dtype:
        _accumulate(param, a @ b)
    else:
        param.grad.addmm_(a, b)


class _DeferredWeightGradLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, store: WeightGradStore
    ) -> Tensor:
        # Autocast does not reach inside a custom Function's saved tensors, so cast here
        # the way autocast would, and keep the cast copies for backward.
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            x, w = x.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
        else:
            w, b = weight, bias
        ctx.save_for_backward(x, w)
        ctx.params = (weight, bias)
        ctx.store = store
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        grad_x = grad @ w if ctx.needs_input_grad[0] else None

        def weight_grad() -> None:
            g2 = grad.reshape(-1, grad.shape[-1])
            _accumulate_matmul(weight, g2.t(), x.reshape(-1, x.shape[-1]))
            if bias is not None:
                _accumulate(bias, g2.sum(0))

        ctx.store.defer(weight_grad)
        return grad_x, None, None, None


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, store: WeightGradStore | None
) -> Tensor:
    """``F.linear`` whose weight (and bias) grads go to ``store`` when one is given."""
    if store is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _DeferredWeightGradLinear.apply(x, weight, bias, store)


class Linear(nn.Linear):
    """``nn.Linear`` that defers its weight-grad to a store when one is attached."""

    weight_grad_store: WeightGradStore | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Same result as ``nn.Linear``; only where the weight-grad is computed differs."""
        return linear(x, self.weight, self.bias, self.weight_grad_store)


def attach_weight_grad_store(module: nn.Module, store: WeightGradStore | None) -> None:
    """Make every :class:`Linear` inside ``module`` defer its weight-grads to ``store``."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.weight_grad_store = store
