"""Lowering: add the SEND/RECV actions that a schedule's placement implies.

A receive is placed right before the compute action that consumes it and a send
right after the action that produces it. The runtime posts receives ahead of
that point on its own; keeping the list in this canonical form makes the pairing
of sends and receives between two ranks follow the same order on both sides.
Stages on the same rank (V placement) hand tensors over locally, with no action.
"""

from __future__ import annotations

from .ir import Action, Kind, Placement, Schedule, ScheduleError

__all__ = ["lower"]


def lower(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with SEND_F/RECV_F/SEND_B/RECV_B actions inserted."""
    if schedule.lowered:
        raise ScheduleError(f"schedule {schedule.name!r} is already lowered")
    place = schedule.placement
    last = schedule.num_stages - 1
    out: dict[int, list[Action]] = {}
    for rank, acts in schedule.actions.items():
        row: list[Action] = []
        for a in acts:
            if not a.kind.is_compute:
                raise ScheduleError(
                    f"schedule {schedule.name!r} rank {rank} holds {a}: communication actions "
                    "are added by lower(); write only F, B, I, W and overlapped pairs"
                )
            # an overlapped pair receives what both halves need first and sends after both
            for p in a.parts:
                row += _comm(p, rank, place, last, before=True)
            row.append(a)
            for p in a.parts:
                row += _comm(p, rank, place, last, before=False)
        out[rank] = row
    return Schedule.build(schedule.name, schedule.num_microbatches, place, out, lowered=True)


def _comm(a: Action, rank: int, place: Placement, last: int, *, before: bool) -> list[Action]:
    """The receive before, or the send after, a single compute action."""
    s, m = a.stage, a.microbatch
    remote_prev = s > 0 and place.rank_of(s - 1) != rank
    remote_next = s < last and place.rank_of(s + 1) != rank
    if a.kind is Kind.F:
        if before:
            return [Action(s, Kind.RECV_F, m)] if remote_prev else []
        return [Action(s, Kind.SEND_F, m)] if remote_next else []
    if a.kind.is_backward:
        if before:
            return [Action(s, Kind.RECV_B, m)] if remote_next else []
        return [Action(s, Kind.SEND_B, m)] if remote_prev else []
    return []  # W: nothing crosses ranks
