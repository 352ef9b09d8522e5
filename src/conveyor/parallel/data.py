"""Data-parallel gradient reduction in flat buckets, overlapped with the rest of backward.

A rank's parameters are grouped, stage by stage and in reverse order of use (the
order backward finishes them), into buckets of about ``bucket_mb`` MiB. Just before a
stage's last backward-ish action of the step (its last B, or its last W under split
backward) the executor arms the stage (``stage_starts_done``); from then on each
parameter's grad is final when autograd accumulates it (a post-accumulate-grad hook),
and a bucket whose parameters are all final is flattened into one buffer and
all-reduced asynchronously over the data-parallel group, while backward goes on with
the layers before it. When the action ends (``stage_done``) the buckets still out (a
parameter that got no grad; weights whose grads a W writes outside autograd) go too.
:meth:`GradBuckets.finish` waits for them all, divides by dp and copies the averages
back into ``.grad``. Every dp replica runs the same actions on the same graph, so
autograd completes, and the buckets go out, in the same order on every replica.
With ``in_backward=False`` (sequence parallelism, whose grads are first summed over tp
for the whole stage) a stage's buckets all go out when its action ends.

Under ZeRO-1 (``zero=``) a bucket is reduce-scattered instead, at the same moments:
each rank receives only the averaged chunks of the bucket's parameters it owns
(``parallel.zero``), which become its optimizer leaves' grads. gloo implements
reduce-scatter on CPU (checked on torch 2.11 and 2.13), so both backends run one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .zero import ZeroShards, reduce_scatter

__all__ = ["GradBuckets", "plan_buckets"]

MIB = 1 << 20


def plan_buckets(params: Sequence[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
    """Split ``params`` (in issue order) into consecutive runs of one dtype, each <= ``cap_bytes``.

    A parameter larger than the cap gets a bucket of its own.
    """
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets and buckets[-1][0].dtype == p.dtype and size + nbytes <= cap_bytes:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


class _Bucket:
    """One flat collective: its parameters and, once issued, its result buffer and work."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.ready: set[int] = set()  # ids of the parameters whose grads are final
        self.result: Tensor | None = None  # all-reduced in place, or this rank's scattered part
        self.sent: Tensor | None = None  # a reduce-scatter's input, held until it completes
        self.work: dist.Work | None = None


class GradBuckets:
    """Averages grads over the dp group in buckets, issued per stage as its backward ends."""

    def __init__(
        self,
        stage_params: dict[int, list[nn.Parameter]],
        group: dist.ProcessGroup | None,
        dp: int,
        bucket_mb: float,
        *,
        before_issue: Callable[[int], None] | None = None,
        zero: ZeroShards | None = None,
        in_backward: bool = True,
    ) -> None:
        """``stage_params``: each stage's parameters in forward order, each parameter once;
        ``zero``: reduce-scatter into these ZeRO-1 chunks instead of all-reducing;
        ``in_backward``: issue each bucket as soon as backward completes it."""
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be > 0 (0 selects the per-parameter path)")
        self.group = group
        self.dp = dp
        # runs on a stage just before its buckets go out (sequence-parallel sums over tp)
        self.before_issue = before_issue
        self.zero = zero
        cap = max(1, int(bucket_mb * MIB))
        self.buckets: dict[int, list[_Bucket]] = {
            s: [_Bucket(b) for b in plan_buckets(list(reversed(ps)), cap)]
            for s, ps in stage_params.items() if ps
        }
        self._issued: set[int] = set()
        self._armed: set[int] = set()
        self._bucket_of: dict[int, tuple[int, _Bucket]] = {}
        if in_backward:
            for stage, bs in self.buckets.items():
                for bucket in bs:
                    for p in bucket.params:
                        self._bucket_of[id(p)] = (stage, bucket)
                        p.register_post_accumulate_grad_hook(self._grad_final)

    @property
    def num_buckets(self) -> int:
        """Buckets in all (all-reduce, or under ZeRO-1 reduce-scatter, calls per step)."""
        return sum(len(bs) for bs in self.buckets.values())

    def stage_starts_done(self, stage: int) -> None:
        """``stage``'s last backward-ish action of the step starts: grads it accumulates are final."""
        if self._bucket_of:
            self._armed.add(stage)

    def _grad_final(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: in an armed stage, ``p``'s grad is final."""
        stage, bucket = self._bucket_of[id(p)]
        if stage not in self._armed or bucket.work is not None:
            return
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._issue(bucket)

    def stage_done(self, stage: int) -> None:
        """Start the collectives of ``stage``'s buckets not yet out: its grads are final."""
        if stage in self._issued:
            return
        self._issued.add(stage)
        self._armed.discard(stage)
        if self.before_issue is not None:
            self.before_issue(stage)
        for bucket in self.buckets.get(stage, ()):
            if bucket.work is None:
                self._issue(bucket)

    def _issue(self, bucket: _Bucket) -> None:
        """Start ``bucket``'s collective on the grads its parameters hold now."""
        with torch.no_grad():
            if self.zero is not None:
                bucket.sent, bucket.result = self.zero.scatter_input(bucket.params)
                bucket.work = reduce_scatter(bucket.result, bucket.sent, self.group, async_op=True)
                return
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
            bucket.result = torch.cat([g.reshape(-1) for g in grads])
            bucket.work = dist.all_reduce(bucket.result, group=self.group, async_op=True)

    def finish(self, stages: Sequence[int]) -> None:
        """Issue what is left (in ``stages`` order), wait for all, write the averages to ``.grad``."""
        for s in stages:
            self.stage_done(s)
        try:
            for bs in self.buckets.values():
                for bucket in bs:
                    assert bucket.result is not None and bucket.work is not None
                    bucket.work.wait()
                    bucket.result.div_(self.dp)
                    if self.zero is not None:
                        self.zero.add_scattered(bucket.params, bucket.result)
                        continue
                    views = bucket.result.split([p.numel() for p in bucket.params])
                    for p, v in zip(bucket.params, views, strict=True):
                        p.grad = v.view_as(p).clone()
        finally:
            self.reset()

    def reset(self) -> None:
        """Forget this step's buffers (after :meth:`finish`, or when a step fails)."""
        self._issued.clear()
        self._armed.clear()
        for bs in self.buckets.values():
            for bucket in bs:
                bucket.result = bucket.sent = bucket.work = None
                bucket.ready.clear()
