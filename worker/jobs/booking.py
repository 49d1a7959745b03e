"""The caller's and the operator's operations on bookings: schedule, cancel, read, list, retry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.rules import lifecycle, meetings
from worker.rules.lifecycle import fmt
from worker.rules.validation import InvalidRequest, ScheduleRequest
from worker.store import journal, persist, session_scope
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
    """Store one booking: the path a batch takes, with a batch of one."""
    after = AfterCommit()
    [(result, _)] = store([request], after)
    after.run()
    return result


def store(requests: Sequence[ScheduleRequest], after: AfterCommit) -> list[tuple[dict[str, Any], bool]]:
    """Store bookings with distinct ids in one transaction: (the meeting view, whether it was
    created) for each, in order. The work they make due is added to `after`, to run once the
    caller's last transaction has committed."""
    mine = AfterCommit()
    try:
        stored = _store(requests, mine)
    except IntegrityError:
        # Another caller booked one of these ids first: the transaction rolled back whole; stored
        # again, that id is now found and rescheduled.
        mine = AfterCommit()
        stored = _store(requests, mine)
    after.merge(mine)
    return stored


def _columns(
    request: ScheduleRequest, create_at: datetime, room_end: datetime, now: datetime
) -> dict[str, Any]:
    """The booking's own columns, the same whether it is new or sent again."""
    return {
        "start": request.start,
        "end": request.end,
        "create_at": create_at,
        "room_end": room_end,
        "room_options": request.room.model_dump(exclude_none=True),
        "notify": request.notify.model_dump() if request.notify else None,
        "meta": request.metadata,
        "updated_at": now,
    }


def _store(requests: Sequence[ScheduleRequest], after: AfterCommit) -> list[tuple[dict[str, Any], bool]]:
    now = utcnow()
    settings = get_settings()
    results: list[tuple[dict[str, Any], bool] | None] = [None] * len(requests)
    # New booking ids, stored together at the end in one INSERT: where each goes in the results.
    booked: list[tuple[dict[str, Any], meetings.Change]] = []
    booked_at: list[int] = []
    with session_scope() as session:
        booking_ids = [request.booking_id for request in requests]
        existing = {
            meeting.booking_id: meeting
            for meeting in session.execute(
                select(Meeting).where(col(Meeting.booking_id).in_(booking_ids)).with_for_update()
            ).scalars()
        }
        room_ids = [m.room_id for m in existing.values() if m.room_id is not None]
        if room_ids:  # loaded into the session at once: current_room then finds each there
            list(session.execute(select(Room).where(col(Room.id).in_(room_ids))).scalars())
        for index, request in enumerate(requests):
            create_at, room_end = lifecycle.plan(request.start, request.end, settings)
            columns = _columns(request, create_at, room_end, now)
            # What the caller did comes first in the history, before any state change it caused.
            span = f"{fmt(request.start)} to {fmt(request.end)}"
            meeting = existing.get(request.booking_id)
            if meeting is None:
                journal.note(session, request.booking_id, "state", "booked", span)
                booked.append(({**columns, "booking_id": request.booking_id}, meetings.booked(create_at)))
                booked_at.append(index)
            else:
                journal.note(session, request.booking_id, "state", "rescheduled", span)
                results[index] = (_reschedule(session, meeting, columns, now, after), False)
        rows = persist.add_meetings(session, booked, now, after)
        for index, row in zip(booked_at, rows, strict=True):
            log.info("booking %s: scheduled, room due at %s", row["booking_id"], fmt(row["due_at"]))
            # The view reads attributes only: a namespace costs a tenth of a Meeting object.
            results[index] = (view(cast(Meeting, SimpleNamespace(**row)), None), True)
    return [result for result in results if result is not None]


def _reschedule(
    session: Session, meeting: Meeting, columns: dict[str, Any], now: datetime, after: AfterCommit
) -> dict[str, Any]:
    """A booking id already stored: the reschedule rule reads the meeting with its new times."""
    room = current_room(session, meeting)
    moved = replace(
        meeting_facts(meeting),
        create_at=columns["create_at"],
        room_end=columns["room_end"],
        start=columns["start"],
    )
    change = meetings.rescheduled(moved, room_facts(room) if room else None, meeting.room_end, now)
    apply(session, meeting, replace(change, meeting={**columns, **change.meeting}), now, after, room)
    return view(meeting, current_room(session, meeting))


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
            start, meeting_id = after
            query = query.where(
                or_(
                    col(Meeting.start) > start,
                    and_(col(Meeting.start) == start, col(Meeting.id) > meeting_id),
                )
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
