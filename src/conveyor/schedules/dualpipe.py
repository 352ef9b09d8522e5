"""DualPipeV: DeepSeek's DualPipe cut in half, on the V placement.

DualPipe (DeepSeek-V3 report, 2024) feeds microbatches into both ends of the pipeline
at once, so every rank holds two copies of the model. Cut in half it needs one: the
V placement (rank r holds stage r, chunk 0, and stage 2p-1-r, chunk 1, as in ZB-V)
sends every microbatch down the ranks and back up. Its mark is the steady phase:
each step is an :func:`~conveyor.schedules.ir.overlap` of the forward of one chunk
with the full backward of the other: one compute action, whose halves the runtime
runs one after the other unless an overlap hook (two CUDA streams, say) runs them
together, hiding one half's communication behind the other's compute. This follows the reference
schedule (``deepseek-ai/DualPipe``'s ``dualpipev.py``, which ``torch.distributed.
pipelining`` ships as ``ScheduleDualPipeV``) action for action, with ``p`` ranks and
``m >= 2p`` microbatches. Rank r, in eight phases:

1. ``2(p-1-r)`` chunk-0 forwards;
2. ``r + 1`` pairs (chunk-0 F, chunk-1 F);
3. ``p-1-r`` triples (chunk-1 I, its W, chunk-1 F): the first backwards, split so the
   W fills the time the next chunk-1 forward waits for its input;
4. ``m - 2p + r + 1`` steady pairs (chunk-0 F overlapped with chunk-1 B, chunk-1 F
   overlapped with chunk-0 B); on the last rank the very first chunk-0 F and chunk-1 B
   run apart, because that B needs that F's output;
5. ``p-1-r`` pairs (chunk-1 B, chunk-1 F overlapped with chunk-0 B);
6. ``r + 1`` pairs (chunk-1 backward, chunk-0 backward), of which the first ``r + 1``
   backwards are full Bs and the last ``r + 1`` are Is;
7. ``p-1-r`` pairs (the oldest pending W, chunk-0 I);
8. the ``r + 1`` Ws still pending, oldest first.

Every W follows its own I, first in first out. Clock table, 2 ranks, 4 microbatches,
as ``conveyor schedule show`` prints it (:meth:`~conveyor.schedules.validate.Execution.
clock_table`: every compute action one tick, an overlapped pair too; ``(0F3;3B1)``:
the stage-0 forward of microbatch 3 with the stage-3 full backward of microbatch 1)::

    rank 0: 0F0                  0F1                  0F2                  3F0                  3I0                  3W0                  3F1                  (0F3;3B1)OVERLAP_F_B (3F2;0B0)OVERLAP_F_B 3B2                  (3F3;0B1)OVERLAP_F_B 3B3                  0I2                  0W2                  0I3                  0W3
    rank 1: .                    1F0                  2F0                  1F1                  2F1                  1F2                  2B0                  (2F2;1B0)OVERLAP_F_B (1F3;2B1)OVERLAP_F_B (2F3;1B1)OVERLAP_F_B 2B2                  1B2                  2I3                  1I3                  2W3                  1W3

Measured for p = 1..8 and m = 2p..2p+19 (a rank runs 2m forwards and 2m backwards,
``2p - 1 - r`` of them split into I and W on rank r):

* :func:`~conveyor.schedules.validate.validate`'s unit costs (F = B = I = W = 1, a
  pair costs 2, its halves run one after the other): makespan ``4m + 3p - 2``,
  ``bubble_fraction = 3(p-1) / (8m + 6p - 4)``;
* with a full B costing its I and W (F = I = W = 1, B = 2, a pair 3), which compares
  with ZB-V and V-Half at 6m units a rank: makespan ``6m + 2p - 2`` (ZB-V: ``6m + p - 1``);
* with the pair's halves fully overlapped (pair = max(F, B) = 2): makespan ``4m + 3p``;
* peak activations ``2p + 1`` chunk-microbatches on every rank, for every m: one chunk
  (half a 1F1B stage) more than 1F1B's and ZB-V's ``2p``.
"""

from __future__ import annotations

from collections import deque

from .ir import Action, B, F, I, Placement, Schedule, ScheduleError, W, check_sizes, overlap

__all__ = ["dualpipev"]


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV on ``num_ranks`` ranks (V placement, 2 chunks each), ``num_microbatches >= 2p``.

    Raises ScheduleError for fewer than ``2 * num_ranks`` microbatches, the bound both
    the reference and torch's ``ScheduleDualPipeV`` enforce: the steady phase of rank 0
    has ``m - 2p + 1`` steps.
    """
    check_sizes("dualpipev", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    if m < 2 * p:
        raise ScheduleError(
            f"schedule 'dualpipev' needs num_microbatches >= 2 * num_ranks (one per stage of "
            f"the V): got num_microbatches={m} with num_ranks={p}; use num_microbatches >= "
            f"{2 * p}, or 'zb-v' for fewer microbatches"
        )
    actions: dict[int, list[Action]] = {}
    for r in range(p):
        x = _Rank(r, 2 * p - 1 - r)
        for _ in range(2 * (p - 1 - r)):
            x.emit(x.forward(0))
        for _ in range(r + 1):
            x.emit(x.forward(0), x.forward(1))
        for _ in range(p - 1 - r):
            x.emit(x.backward(1, split=True))
            x.emit_weight()
            x.emit(x.forward(1))
        for i in range(m - 2 * p + r + 1):
            if i == 0 and r == p - 1:
                x.emit(x.forward(0), x.backward(1))
            else:
                x.emit(overlap(x.forward(0), x.backward(1)))
            x.emit(overlap(x.forward(1), x.backward(0)))
        for _ in range(p - 1 - r):
            x.emit(x.backward(1))
            x.emit(overlap(x.forward(1), x.backward(0)))
        for k in range(2 * (r + 1)):
            x.emit(x.backward(1 - k % 2, split=k > r))
        for _ in range(p - 1 - r):
            x.emit_weight()
            x.emit(x.backward(0, split=True))
        for _ in range(r + 1):
            x.emit_weight()
        assert not x.pending, f"rank {r} left Ws behind: {list(x.pending)}"
        actions[r] = x.actions
    return Schedule.build("dualpipev", m, Placement.vshape(p), actions)


class _Rank:
    """One rank's action list: numbers each chunk's forwards and backwards in order.

    A split backward (I) queues its W; :meth:`emit_weight` runs the oldest one.
    """

    def __init__(self, *stages: int) -> None:
        self.stages = stages
        self.forwards = [0 for _ in stages]
        self.backwards = [0 for _ in stages]
        self.pending: deque[Action] = deque()
        self.actions: list[Action] = []

    def forward(self, chunk: int) -> Action:
        mb = self.forwards[chunk]
        self.forwards[chunk] += 1
        return F(self.stages[chunk], mb)

    def backward(self, chunk: int, split: bool = False) -> Action:
        stage, mb = self.stages[chunk], self.backwards[chunk]
        self.backwards[chunk] += 1
        if split:
            self.pending.append(W(stage, mb))
            return I(stage, mb)
        return B(stage, mb)

    def emit(self, *actions: Action) -> None:
        self.actions += actions

    def emit_weight(self) -> None:
        self.actions.append(self.pending.popleft())
