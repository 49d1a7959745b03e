"""Applies what a rule decided (`worker/rules/meetings.py`) to the store, and sends the work it made due.

Nothing here decides: `apply` sets the columns a Change names, writes the history line and the
event, and notes which rows must be dispatched once the transaction has committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, or_, update
from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.jobs.dispatch import dispatch_due, dispatch_horizon
from worker.jobs.outbox import flush_outbox
from worker.rules import lifecycle, meetings
from worker.store import journal
from worker.store.models import Meeting, MeetingState, Room, RoomState


@dataclass
class AfterCommit:
    """Work that may only start once the transaction that justifies it has committed."""

    meetings: set[int] = field(default_factory=set)
    rooms: set[int] = field(default_factory=set)
    outbox: bool = False

    def due(
        self, model: type[Meeting] | type[Room], pk: int | None, at: datetime | None, now: datetime
    ) -> None:
        """Send this row's work right after the commit if it falls due before the dispatcher's next
        tick; anything later is the dispatcher's, so a booking days ahead costs no dispatch query."""
        if pk is not None and at is not None and at <= dispatch_horizon(now, get_settings()):
            (self.meetings if model is Meeting else self.rooms).add(pk)

    def run(self) -> None:
        if self.meetings or self.rooms:
            dispatch_due(meeting_ids=self.meetings, room_ids=self.rooms)
        if self.outbox:
            flush_outbox()


def meeting_facts(meeting: Meeting | Row[Any]) -> meetings.MeetingFacts:
    """What the rules read of a meeting: from its ORM object, or a Core row with the same columns."""
    return meetings.MeetingFacts(
        state=MeetingState(meeting.state),
        create_at=meeting.create_at,
        room_end=meeting.room_end,
        due_at=meeting.due_at,
        attempts=meeting.attempts,
        replacing=meeting.replacing,
        room_id=meeting.room_id,
        overrun=lifecycle.overrun(get_settings()),
        start=getattr(meeting, "start", None),
    )


def room_facts(room: Room) -> meetings.RoomFacts:
    assert room.id is not None
    return meetings.RoomFacts(
        id=room.id,
        state=RoomState(room.state),
        end_date=room.end_date,
        due_at=room.due_at,
        retired_reason=room.retired_reason,
        whereby_id=room.whereby_id,
        participants=room.participants,
        occupancy_at=room.occupancy_at,
        overrun_since=room.overrun_since,
    )


def current_room(session: Session, meeting: Meeting) -> Room | None:
    return session.get(Room, meeting.room_id) if meeting.room_id is not None else None


def apply(
    session: Session,
    meeting: Meeting,
    change: meetings.Change,
    now: datetime,
    after: AfterCommit,
    room: Room | None = None,
) -> None:
    """Write `change` (decided for `meeting` and, where the input was about one, `room`)."""
    if room is not None and change.room:
        for name, value in change.room.items():
            setattr(room, name, value)
        if "due_at" in change.room:
            after.due(Room, room.id, room.due_at, now)
    for name, value in change.meeting.items():
        setattr(meeting, name, value)
    if change.changes_meeting:
        meeting.updated_at = now
    if "due_at" in change.meeting:
        after.due(Meeting, meeting.id, meeting.due_at, now)
    if change.state is not None and change.state != meeting.state:
        journal.note_state(session, meeting.booking_id, meeting.state, change.state, change.why)
        meeting.state = change.state
    if change.note:
        journal.note(session, meeting.booking_id, "note", change.note, change.note_outcome)
    if change.retire_replaced is not None:
        _retire_replaced(session, meeting, change.retire_replaced, now, after)
    if change.event:
        shown = room if room is not None and meeting.room_id == room.id else current_room(session, meeting)
        after.outbox |= journal.emit(session, meeting, shown, change.event, now)


def _retire_replaced(
    session: Session, meeting: Meeting, at: datetime, now: datetime, after: AfterCommit
) -> None:
    """Rooms this meeting no longer needs that wait for their replacement: delete them by `at`."""
    replaced = (
        col(Room.meeting_pk) == meeting.id,
        col(Room.retired_reason) == "replaced",
        col(Room.state) == RoomState.LIVE,
    )
    late = or_(col(Room.due_at).is_(None), col(Room.due_at) > at)
    session.execute(update(Room).where(*replaced, late).values(due_at=at))
    for pk in session.execute(select(Room.id).where(*replaced)).scalars():
        after.due(Room, pk, at, now)
