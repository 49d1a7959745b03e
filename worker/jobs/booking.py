"""The caller's and the operator's operations on bookings: schedule, cancel, read, list, retry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.rules import lifecycle, meetings
from worker.rules.lifecycle import fmt
from worker.rules.validation import InvalidRequest, ScheduleRequest
from worker.store import journal, session_scope
from worker.store.journal import view
from worker.store.models import History, Meeting, MeetingState, Room, utcnow
from worker.store.persist import AfterCommit, apply, current_room, meeting_facts, room_facts

log = logging.getLogger(__name__)


class UnknownBooking(InvalidRequest):
    """No meeting has this booking_id."""


def _load(session: Session, booking_id: str, *, for_update: bool = False) -> Meeting | None:
    query = select(Meeting).where(Meeting.booking_id == booking_id)
    if for_update:
        query = query.with_for_update()
    return session.execute(query).scalar_one_or_none()


def _known(session: Session, booking_id: str, *, for_update: bool = False) -> Meeting:
    meeting = _load(session, booking_id, for_update=for_update)
    if meeting is None:
        raise UnknownBooking(f"booking_id: no meeting with booking_id {booking_id!r}")
    return meeting


def get_meeting(booking_id: str) -> dict[str, Any]:
    with session_scope() as session:
        meeting = _known(session, booking_id)
        return view(meeting, current_room(session, meeting))


def schedule_meeting(request: ScheduleRequest) -> dict[str, Any]:
    try:
        return _schedule(request)
    except IntegrityError:
        # Two first bookings of one id raced; the loser now finds the row and reschedules it.
        return _schedule(request)


def _schedule(request: ScheduleRequest) -> dict[str, Any]:
    now = utcnow()
    create_at, room_end = lifecycle.plan(request.start, request.end, get_settings())
    after = AfterCommit()
    span = f"{fmt(request.start)} to {fmt(request.end)}"
    with session_scope() as session:
        meeting = _load(session, request.booking_id, for_update=True)
        fields: dict[str, Any] = {
            "start": request.start,
            "end": request.end,
            "create_at": create_at,
            "room_end": room_end,
            "room_options": request.room.model_dump(exclude_none=True),
            "notify": request.notify.model_dump() if request.notify else None,
            "meta": request.metadata,
            "updated_at": now,
        }
        room = None
        action = "booked" if meeting is None else "rescheduled"
        if meeting is None:
            change = meetings.booked(create_at)
            meeting = Meeting(
                booking_id=request.booking_id, state=MeetingState.SCHEDULED, created_at=now, **fields
            )
            session.add(meeting)
            log.info("booking %s: scheduled, room due at %s", meeting.booking_id, fmt(create_at))
        else:
            old_room_end = meeting.room_end
            for name, value in fields.items():
                setattr(meeting, name, value)
            room = current_room(session, meeting)
            change = meetings.rescheduled(
                meeting_facts(meeting), room_facts(room) if room else None, old_room_end, now
            )
        session.flush()  # the new meeting's id, for the dispatch after commit
        # What the caller did comes first in the history, before any state change it caused.
        journal.note(session, meeting.booking_id, "state", action, span)
        apply(session, meeting, change, now, after, room)
        result = view(meeting, current_room(session, meeting))
    after.run()
    return result


def cancel_meeting(booking_id: str) -> dict[str, Any]:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        meeting = _known(session, booking_id, for_update=True)
        room = current_room(session, meeting)
        change = meetings.cancelled(meeting_facts(meeting), room_facts(room) if room else None, now)
        apply(session, meeting, change, now, after, room)
        result = view(meeting, room)
    after.run()
    return result


def history(booking_id: str) -> list[History]:
    with session_scope() as session:
        return list(
            session.execute(
                select(History).where(History.booking_id == booking_id).order_by(col(History.id))
            ).scalars()
        )


def retry_failed(booking_ids: Sequence[str] | None) -> list[str]:
    """Put failed meetings back to be tried afresh (all of them when booking_ids is None)."""
    now = utcnow()
    after = AfterCommit()
    retried = []
    with session_scope() as session:
        query = select(Meeting).where(Meeting.state == MeetingState.FAILED)
        if booking_ids is not None:
            query = query.where(col(Meeting.booking_id).in_(list(booking_ids)))
        for meeting in session.exec(query):
            change = meetings.retried(meeting_facts(meeting), now)
            apply(session, meeting, change, now, after)
            if change.state is not None:
                retried.append(meeting.booking_id)
    after.run()
    return retried


def list_meetings(state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    with session_scope() as session:
        query = select(Meeting).order_by(col(Meeting.start)).limit(limit)
        if state:
            query = query.where(Meeting.state == state)
        meetings = list(session.execute(query).scalars())
        return [view(m, current_room(session, m)) for m in meetings]


def list_page(
    state: str | None, limit: int, after: tuple[datetime, int] | None = None
) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
    """Meetings soonest first (by start, then id), `limit` at a time, from just past `after`.

    Returns the views and the (start, id) to pass as `after` for the next page, None at the end.
    Keyset paging: a page costs its own rows however deep it is, and rows added meanwhile never
    shift it."""
    with session_scope() as session:
        query = select(Meeting).order_by(col(Meeting.start), col(Meeting.id)).limit(limit + 1)
        if state:
            query = query.where(Meeting.state == state)
        if after is not None:
            start, pk = after
            query = query.where(
                or_(col(Meeting.start) > start, and_(col(Meeting.start) == start, col(Meeting.id) > pk))
            )
        meetings = list(session.execute(query).scalars())
        more = len(meetings) > limit
        meetings = meetings[:limit]
        # One query for the page's rooms: current_room then finds each in the session.
        room_ids = [m.room_id for m in meetings if m.room_id is not None]
        if room_ids:
            list(session.execute(select(Room).where(col(Room.id).in_(room_ids))).scalars())
        views = [view(m, current_room(session, m)) for m in meetings]
        last = meetings[-1] if more else None
        return views, (last.start, last.id) if last is not None and last.id is not None else None
