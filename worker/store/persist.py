"""The one writer of lifecycle state: applies what a rule decided (`worker/rules/meetings.py`).

Nothing here decides: `apply` sets the columns a Change names, writes the history line and the
event, and notes which rows must be dispatched once the transaction has committed. Its other forms
write the same Change another way: `add_meetings` for many new bookings in one INSERT (the batch
path), `apply_claimed` in one Core UPDATE for the row a run has just claimed (the creation's hot
path), `add_attempt_room` for an attempt's pending room. No other module assigns a meeting's or a
room's state, due instant, attempts or the like (`tests/pure/test_one_writer.py` checks the source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, or_, update
from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.adapters import whereby
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
        self, model: type[Meeting] | type[Room], row_id: int | None, at: datetime | None, now: datetime
    ) -> None:
        """Send this row's work right after the commit if it falls due before the dispatcher's next
        tick; anything later is the dispatcher's, so a booking days ahead costs no dispatch query."""
        if row_id is not None and at is not None and at <= dispatch_horizon(now, get_settings()):
            (self.meetings if model is Meeting else self.rooms).add(row_id)

    def merge(self, other: AfterCommit) -> None:
        self.meetings |= other.meetings
        self.rooms |= other.rooms
        self.outbox |= other.outbox

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
    for room_id in session.execute(select(Room.id).where(*replaced)).scalars():
        after.due(Room, room_id, at, now)


# A new meeting's lifecycle columns before its first Change: no room, no attempt, nothing failed.
_NEW_MEETING: dict[str, Any] = {
    "room_id": None,
    "due_at": None,
    "attempts": 0,
    "replacing": False,
    "last_error": None,
}


def add_meetings(
    session: Session,
    booked: Sequence[tuple[dict[str, Any], meetings.Change]],
    now: datetime,
    after: AfterCommit,
) -> list[dict[str, Any]]:
    """The bulk form of `apply` for new bookings: each (columns, Change) becomes one row of one
    multi-row INSERT. Returns the rows as stored, each with its new `id`, in order.

    A first booking's Change only sets columns (`meetings.booked`): no history line, no event."""
    rows = []
    for columns, change in booked:
        assert change.state is not None and not (change.event or change.note or change.room)
        rows.append({**columns, **_NEW_MEETING, **change.meeting, "state": change.state, "created_at": now})
    if not rows:
        return []
    meeting_ids = (
        session.execute(insert(Meeting).returning(col(Meeting.id), sort_by_parameter_order=True), rows)
        .scalars()
        .all()
    )
    for row, meeting_id in zip(rows, meeting_ids, strict=True):
        row["id"] = meeting_id
        after.due(Meeting, meeting_id, row["due_at"], now)
    return rows


def apply_claimed(
    session: Session, meeting_id: int, claimed: Row[Any], change: meetings.Change, now: datetime
) -> None:
    """`apply` in one Core UPDATE, for the meeting a run has just claimed (`claims.take` returned
    `claimed`, with its booking_id and state): no ORM object, as the creation's hot path needs.
    Only for a Change that sets the meeting's own columns (the rule's plain act or skip)."""
    assert not (change.room or change.event or change.note or change.retire_replaced)
    assert "due_at" not in change.meeting  # nothing to dispatch after the commit
    values = dict(change.meeting)
    if change.state is not None:
        values["state"] = change.state
    if change.changes_meeting:
        values["updated_at"] = now
    session.connection().execute(update(Meeting).where(col(Meeting.id) == meeting_id).values(**values))
    if change.state is not None and change.state != claimed.state:
        journal.note_state(session, claimed.booking_id, claimed.state, str(change.state), change.why)


def add_attempt_room(
    session: Session, meeting_id: int, tag: str, name_prefix: str, end_date: datetime, now: datetime
) -> int:
    """An attempt's room row, pending until Whereby answers: stored before the call, so that an
    attempt whose reply is lost can be found again by its tag."""
    room_id: int | None = (
        session.connection()
        .execute(
            insert(Room)
            .values(
                meeting_pk=meeting_id,
                tag=tag,
                name_prefix=name_prefix,
                state=RoomState.PENDING,
                end_date=end_date,
                created_at=now,
            )
            .returning(col(Room.id))
        )
        .scalar_one()
    )
    assert room_id is not None
    return room_id


def fill_room(room: Room, made: whereby.Meeting) -> None:
    """Copy what Whereby answered into the attempt's room row (a fact, not a decision)."""
    room.whereby_id = made.meeting_id
    room.room_name = made.room_name
    room.room_url = made.room_url
    room.host_room_url = made.host_room_url
    room.viewer_room_url = made.viewer_room_url
    room.end_date = made.end_date
