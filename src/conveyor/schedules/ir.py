"""The schedule IR: actions, stage placement and per-rank action lists.

A pipeline schedule is plain data. For every rank it holds the ordered list of
actions that rank performs in one training step. Every other part of Conveyor
(validator, lowering, runtime, simulator, plots) reads this data; none of them
knows a schedule by name.

Text form of an action is ``<stage><kind><microbatch>``, e.g. ``1F0`` (stage 1,
forward of microbatch 0), ``0I3`` or ``0SEND_F3``; an overlapped forward/backward
pair reads ``(2F5;1B3)OVERLAP_F_B``. ``Action.parse`` reads it back. Letters and
text form are those of ``torch.distributed.pipelining``'s action IR, so schedule
tables exchange with it both ways.

Backward kinds: ``B`` is a full backward (input-grad and weight-grad together);
``I`` computes the input-grad only, and its ``W`` the weight-grad later. A stage
and microbatch has either one ``B`` or an ``I`` then a ``W``; one schedule may mix
both.

No torch here: schedules are tested without processes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "overlap",
    "Kind",
    "Action",
    "Placement",
    "Schedule",
    "ScheduleError",
    "COMPUTE_KINDS",
    "COMM_KINDS",
    "check_sizes",
]


class ScheduleError(ValueError):
    """A schedule (built-in, hand-written or lowered) is malformed or cannot run."""


class Kind(enum.Enum):
    """What an action does. F/B/W compute; the rest move tensors between ranks."""

    F = "F"  # forward
    B = "B"  # full backward: input-grad and weight-grad together
    I = "I"  # noqa: E741 - torch's letter: input-grad only; its W comes later
    W = "W"  # weight-grad of an earlier I
    OVERLAP_F_B = "OVERLAP_F_B"  # a forward and a backward run as one (DualPipeV)
    SEND_F = "SEND_F"  # send this stage's output activation to the next stage
    RECV_F = "RECV_F"  # receive this stage's input activation from the previous stage
    SEND_B = "SEND_B"  # send the grad of this stage's input to the previous stage
    RECV_B = "RECV_B"  # receive the grad of this stage's output from the next stage

    @property
    def is_compute(self) -> bool:
        """True for F, B, I, W and the overlapped pair."""
        return self in COMPUTE_KINDS

    @property
    def is_backward(self) -> bool:
        """True for the kinds that send a grad back: B and I."""
        return self in (Kind.B, Kind.I)


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W, Kind.OVERLAP_F_B})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")
_OVERLAP_RE = re.compile(r"^\((.*)\)OVERLAP_F_B$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` applied to ``microbatch`` on ``stage``."""

    stage: int
    kind: Kind
    microbatch: int
    sub: tuple[Action, ...] = ()
    """The forward and the backward of an OVERLAP_F_B pair (empty otherwise)."""

    def __str__(self) -> str:
        if self.kind is Kind.OVERLAP_F_B:
            return "(" + ";".join(str(a) for a in self.sub) + ")OVERLAP_F_B"
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @property
    def parts(self) -> tuple[Action, ...]:
        """The single actions this one runs: its pair when overlapped, else itself."""
        return self.sub if self.kind is Kind.OVERLAP_F_B else (self,)

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read an action back from its text form, e.g. ``'1F0'`` or ``'(2F5;1B3)OVERLAP_F_B'``."""
        text = text.strip()
        pair = _OVERLAP_RE.match(text)
        if pair is not None:
            parts = [cls.parse(t) for t in pair.group(1).split(";")]
            if len(parts) != 2:
                raise ScheduleError(f"{text!r}: an overlapped pair holds exactly two actions")
            return overlap(*parts)
        m = _ACTION_RE.match(text)
        if m is None:
            raise ScheduleError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> "
                "such as '1F0', '0B3', '0I3', '2W1' or '0SEND_F2', or an overlapped pair "
                "'(2F5;1B3)OVERLAP_F_B'"
            )
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))


def F(stage: int, mb: int) -> Action:  # noqa: N802 - reads like the paper's notation
    """Forward of microbatch ``mb`` on ``stage``."""
    return Action(stage, Kind.F, mb)


def B(stage: int, mb: int) -> Action:  # noqa: N802
    """Full backward (input-grad and weight-grad) of ``mb`` on ``stage``."""
    return Action(stage, Kind.B, mb)


def I(stage: int, mb: int) -> Action:  # noqa: N802, E743
    """Input-grad of ``mb`` on ``stage``; its weight-grad waits for a later W."""
    return Action(stage, Kind.I, mb)


def W(stage: int, mb: int) -> Action:  # noqa: N802
    """Weight-grad of ``mb`` on ``stage`` (after its I)."""
    return Action(stage, Kind.W, mb)


def overlap(forward: Action, backward: Action) -> Action:
    """A forward and a backward (B or I) of one rank, run as one compute action."""
    if forward.kind is not Kind.F or not backward.kind.is_backward:
        raise ScheduleError(
            f"an overlapped pair is a forward then a backward (B or I); got {forward} and "
            f"{backward}"
        )
    return Action(-1, Kind.OVERLAP_F_B, -1, (forward, backward))


@dataclass(frozen=True)
class Placement:
    """Which rank (within the pipeline group) holds each stage.

    ``stage_to_rank[s]`` is the rank of stage ``s``; a rank may hold several stages
    (virtual stages / model chunks).
    """

    stage_to_rank: tuple[int, ...]

    @classmethod
    def looped(cls, num_ranks: int, chunks: int = 1) -> Placement:
        """Stage ``s`` on rank ``s % num_ranks`` (1F1B, GPipe, interleaved 1F1B)."""
        return cls(tuple(s % num_ranks for s in range(num_ranks * chunks)))

    @classmethod
    def vshape(cls, num_ranks: int) -> Placement:
        """Two chunks per rank, down then back up: rank r holds stages r and 2p-1-r (ZB-V)."""
        down = list(range(num_ranks))
        return cls(tuple(down + down[::-1]))

    @property
    def num_stages(self) -> int:
        """Number of stages (model chunks) in the pipeline."""
        return len(self.stage_to_rank)

    @property
    def num_ranks(self) -> int:
        """Number of pipeline ranks."""
        return max(self.stage_to_rank) + 1

    def rank_of(self, stage: int) -> int:
        """The rank holding ``stage``."""
        return self.stage_to_rank[stage]

    def stages_of(self, rank: int) -> list[int]:
        """Stages held by ``rank``, in increasing order."""
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    @property
    def shape(self) -> str:
        """'looped' or 'vshape' when this is one of those layouts, else 'custom'."""
        p, n = self.num_ranks, self.num_stages
        if n % p == 0 and self == Placement.looped(p, n // p):
            return "looped"
        if n == 2 * p and self == Placement.vshape(p):
            return "vshape"
        return "custom"


@dataclass(frozen=True)
class Schedule:
    """A complete pipeline schedule: per-rank ordered action lists plus placement."""

    name: str
    num_microbatches: int
    placement: Placement
    actions: Mapping[int, tuple[Action, ...]]
    lowered: bool = field(default=False)

    @classmethod
    def build(
        cls,
        name: str,
        num_microbatches: int,
        placement: Placement,
        actions: Mapping[int, Iterable[Action]],
        lowered: bool = False,
    ) -> Schedule:
        """Make a schedule, freezing the per-rank lists."""
        frozen = {r: tuple(actions.get(r, ())) for r in range(placement.num_ranks)}
        return cls(name, num_microbatches, placement, frozen, lowered)

    @property
    def num_stages(self) -> int:
        """Number of stages (model chunks)."""
        return self.placement.num_stages

    @property
    def num_ranks(self) -> int:
        """Number of pipeline ranks."""
        return self.placement.num_ranks

    @property
    def split_backward(self) -> bool:
        """True when some backward is split into an I and a later W."""
        return any(p.kind is Kind.I for p in self.parts())

    @property
    def forward_only(self) -> bool:
        """True when the schedule has no backward at all (evaluation / inference)."""
        return not any(p.kind in (Kind.B, Kind.I, Kind.W) for p in self.parts())

    def parts(self, rank: int | None = None) -> list[Action]:
        """Single actions of ``rank`` (or of all ranks) in order, overlapped pairs opened."""
        ranks = self.actions if rank is None else [rank]
        return [p for r in ranks for a in self.actions[r] for p in a.parts]

    def compute_actions(self, rank: int) -> list[Action]:
        """The compute actions of ``rank`` in order, without communication."""
        return [a for a in self.actions[rank] if a.kind.is_compute]

    def table(self) -> str:
        """Per-rank action lists as a text grid, one row per rank."""
        return format_table(self.actions)


def check_sizes(name: str, num_ranks: int, num_microbatches: int) -> None:
    """Raise ScheduleError unless a schedule of ``name`` can have these sizes at all."""
    for field_name, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(
                f"schedule {name!r} needs {field_name} >= 1: got {field_name}={value!r}"
            )


def format_table(
    actions: Mapping[int, Sequence[Action]], marks: Iterable[tuple[int, int]] = ()
) -> str:
    """Render ``rank -> actions`` as aligned rows; each ``(rank, index)`` in marks is bracketed."""
    marked = set(marks)
    cells = {
        r: [f"[{a}]" if (r, i) in marked else str(a) for i, a in enumerate(acts)]
        for r, acts in actions.items()
    }
    width = max((len(c) for row in cells.values() for c in row), default=1)
    lines = []
    for r in sorted(cells):
        lines.append(f"rank {r}: " + " ".join(c.rjust(width) for c in cells[r]))
    return "\n".join(lines)
