"""Many bookings at once (CONTRACT §4.2 `POST /v1/bookings/batch`, task `rooms.schedule_meetings`).

Every item is validated on its own by the model that validates one booking (`ScheduleRequest`), so
a bad item gets its own errors and never blocks the good ones. The good ones are stored in one
transaction per chunk of CHUNK items: new booking ids in one multi-row INSERT (and their history
in one more, see `worker/store/journal.py`); ids already stored go through the reschedule rule one by one
inside the same transaction. The work that falls due at once is dispatched once, after the whole
batch has committed.

A booking id that appears more than once in one batch is stored from its first item; every later
item with that id is refused (`booking_id: appears more than once in this batch`), so the answer
never depends on which of two contradicting items "won".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.rules import lifecycle, meetings
from worker.rules.lifecycle import fmt
from worker.rules.validation import ScheduleRequest, problems
from worker.store import journal, session_scope
from worker.store.journal import view
from worker.store.models import Meeting, Room, utcnow
from worker.store.persist import AfterCommit, apply, current_room, meeting_facts, room_facts

log = logging.getLogger(__name__)

MAX_ITEMS = 1000
# Items stored per transaction: large enough that a batch costs a handful of commits, small enough
# that one transaction never holds SQLite's single write lock for long.
CHUNK = 200


class ScheduleBatch(BaseModel):
    """The batch itself: `bookings`, a list of up to MAX_ITEMS items, each checked on its own."""

    model_config = ConfigDict(extra="forbid")

    bookings: Annotated[list[Any], Field(max_length=MAX_ITEMS)]


_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.DOTALL)


def named_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """`worker.rules.validation.problems`, with the field of a rule that names it in its message
    (`end: must be after start`) moved into `field`, as callers of the HTTP face read it."""
    named = []
    for field, rule in problems(exc):
        if not field and (found := _FIELD.match(rule)):
            field, rule = found.group(1), found.group(2)
        named.append((field, rule))
    return named


def failure(errors: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"ok": False, "errors": [{"field": field, "rule": rule} for field, rule in errors]}


def success(meeting_view: dict[str, Any], created: bool) -> dict[str, Any]:
    return {"ok": True, "created": created, "view": meeting_view}


def _parse(item: Any, context: dict[str, Any]) -> ScheduleRequest | list[tuple[str, str]]:
    if not isinstance(item, dict):
        return [("", "each booking must be a JSON object")]
    try:
        return ScheduleRequest.model_validate(item, context=context)
    except ValidationError as exc:
        return named_problems(exc)


def schedule_many(items: Sequence[Any], *, over_http: bool = False) -> list[dict[str, Any]]:
    """One result per item, in order: `{"ok": true, "created": bool, "view": VIEW}` or
    `{"ok": false, "errors": [{"field", "rule"}, ...]}` (fields named within the item).
    `over_http`: the items came over HTTP, where a notify task must be one the operator lists."""
    settings = get_settings()
    context = {
        "caller_prefix_max": settings.caller_prefix_max,
        "over_http": over_http,
        "settings": settings,
        "now": utcnow(),
    }
    results: list[dict[str, Any] | None] = [None] * len(items)
    valid: list[tuple[int, ScheduleRequest]] = []
    first_at: dict[str, int] = {}
    for index, item in enumerate(items):
        parsed = _parse(item, context)
        if isinstance(parsed, list):
            results[index] = failure(parsed)
            continue
        first = first_at.setdefault(parsed.booking_id, index)
        if first != index:
            results[index] = failure(
                [("booking_id", f"appears more than once in this batch (first as item {first})")]
            )
            continue
        valid.append((index, parsed))
    after = AfterCommit()
    try:
        for chunk in _chunks(valid, CHUNK):
            for index, result in _store_chunk(chunk, after):
                results[index] = result
    finally:
        # Should a chunk fail, the ones committed before it are stored: their due work goes now
        # (beat's dispatcher would find it anyway, up to an interval later).
        after.run()
    done = [r for r in results if r is not None]
    assert len(done) == len(items)
    log.info("batch of %d: %d stored, %d refused", len(items), len(valid), len(items) - len(valid))
    return done


def _chunks(
    items: list[tuple[int, ScheduleRequest]], size: int
) -> Iterator[list[tuple[int, ScheduleRequest]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _store_chunk(
    chunk: list[tuple[int, ScheduleRequest]], after: AfterCommit
) -> list[tuple[int, dict[str, Any]]]:
    mine = AfterCommit()
    try:
        stored = _store(chunk, mine)
    except IntegrityError:
        # Another caller booked one of these ids first: the chunk rolled back whole; stored again,
        # that id is now found and rescheduled, like `booking.schedule_meeting` does.
        mine = AfterCommit()
        stored = _store(chunk, mine)
    after.meetings |= mine.meetings
    after.rooms |= mine.rooms
    after.outbox |= mine.outbox
    return stored


def _fields(
    request: ScheduleRequest, create_at: datetime, room_end: datetime, now: datetime
) -> dict[str, Any]:
    # The same columns `booking._schedule` sets: a batch item is stored as that single booking is.
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


def _store(chunk: list[tuple[int, ScheduleRequest]], after: AfterCommit) -> list[tuple[int, dict[str, Any]]]:
    now = utcnow()
    settings = get_settings()
    out: list[tuple[int, dict[str, Any]]] = []
    fresh: list[tuple[int, dict[str, Any]]] = []
    with session_scope() as session:
        ids = [request.booking_id for _, request in chunk]
        existing = {
            meeting.booking_id: meeting
            for meeting in session.execute(
                select(Meeting).where(col(Meeting.booking_id).in_(ids)).with_for_update()
            ).scalars()
        }
        room_ids = [m.room_id for m in existing.values() if m.room_id is not None]
        if room_ids:  # loaded into the session at once: current_room then finds each there
            list(session.execute(select(Room).where(col(Room.id).in_(room_ids))).scalars())
        for index, request in chunk:
            create_at, room_end = lifecycle.plan(request.start, request.end, settings)
            fields = _fields(request, create_at, room_end, now)
            span = f"{fmt(request.start)} to {fmt(request.end)}"
            meeting = existing.get(request.booking_id)
            if meeting is None:
                change = meetings.booked(create_at)
                assert change.state is not None and not (change.event or change.note)
                row = {
                    **fields,
                    "booking_id": request.booking_id,
                    "state": change.state,
                    "created_at": now,
                    "room_id": None,
                    "due_at": None,
                    "attempts": 0,
                    "replacing": False,
                    "last_error": None,
                    **change.meeting,
                }
                fresh.append((index, row))
                journal.note(session, request.booking_id, "state", "booked", span)
            else:
                journal.note(session, request.booking_id, "state", "rescheduled", span)
                out.append((index, success(_reschedule(session, meeting, fields, now, after), created=False)))
        if fresh:
            rows = [row for _, row in fresh]
            pks = (
                session.execute(
                    insert(Meeting).returning(col(Meeting.id), sort_by_parameter_order=True), rows
                )
                .scalars()
                .all()
            )
            for (index, row), pk in zip(fresh, pks, strict=True):
                after.due(Meeting, pk, row["due_at"], now)
                # The view reads attributes only: a namespace costs a tenth of a Meeting object.
                shown = cast(Meeting, SimpleNamespace(id=pk, **row))
                out.append((index, success(view(shown, None), created=True)))
    return out


def _reschedule(
    session: Session, meeting: Meeting, fields: dict[str, Any], now: datetime, after: AfterCommit
) -> dict[str, Any]:
    """`booking._schedule`'s path for a booking id already stored, inside the chunk's transaction."""
    old_room_end = meeting.room_end
    for name, value in fields.items():
        setattr(meeting, name, value)
    room = current_room(session, meeting)
    change = meetings.rescheduled(
        meeting_facts(meeting), room_facts(room) if room else None, old_room_end, now
    )
    apply(session, meeting, change, now, after, room)
    return view(meeting, current_room(session, meeting))
