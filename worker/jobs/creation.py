"""Creating a meeting's room on Whereby: claim, record the attempt, call, and apply the outcome.

Whereby has no idempotency key, so every attempt is stored (a pending room row with a random tag
that goes into the room name) before the POST. When an outcome is unknown (a timeout, a reply lost
after the room was made) the next attempt looks the tag up and adopts the room instead of making
a second one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, update
from sqlmodel import Session, col, select

from config.settings import Settings, get_settings
from worker.adapters import whereby, whereby_calls
from worker.jobs.call_failures import WherebyCallFailed, heed_rate_limit
from worker.rules import lifecycle, meetings
from worker.store import claims, deployment, journal, persist, session_scope
from worker.store.models import Meeting, Room, RoomState, utcnow
from worker.store.persist import AfterCommit, apply, meeting_facts, room_facts

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    run: str
    room_id: int
    booking_id: str
    name_prefix: str
    request: whereby.CreateMeetingRequest
    look_up_first: bool


def create_room(meeting_id: int, claim: str) -> str:
    """Make the meeting's room on Whereby. Returns what happened; raises WherebyCallFailed when the
    call failed (the retry is already planned in the store), so Flower shows the failure."""
    settings = get_settings()
    with claims.message(Meeting, meeting_id, claim):
        attempt = _start(meeting_id, settings)
    if isinstance(attempt, str):
        return attempt
    with whereby_calls.recording_calls() as calls, claims.renewer.holding(Meeting, meeting_id, attempt.run):
        try:
            made = _make_room(attempt)
        except whereby.WherebyError as error:
            outcome = _failed(meeting_id, attempt, error, calls, settings)
            raise WherebyCallFailed.from_error(error, attempt.booking_id, outcome) from None
    return _succeeded(meeting_id, attempt, made, calls, settings)


def _start(meeting_id: int, settings: Settings) -> Attempt | str:
    """Claim the meeting, record the attempt and its pending room, and say what to ask Whereby.

    The common case (due, wanted, not over) is plain SQL: this transaction runs once for every
    room made, and the ORM's unit of work cost more CPU than the Whereby call itself."""
    now = utcnow()
    identity = deployment.identity()  # read before this transaction opens: it reads the store too
    after = AfterCommit()
    with session_scope() as session:
        claimed = claims.take(
            session,
            Meeting,
            meeting_id,
            settings,
            Meeting.booking_id,
            Meeting.state,
            Meeting.create_at,
            Meeting.due_at,
            Meeting.room_end,
            Meeting.room_options,
            Meeting.attempts,
            Meeting.replacing,
            Meeting.room_id,
        )
        if claimed is None:
            return claims.NOTHING_TO_DO
        change = meetings.creation_due(meeting_facts(claimed), now)
        result: Attempt | str = change.outcome
        if change.act:
            result = _record_attempt(session, meeting_id, claimed, change, now, identity, settings)
        elif change.state is None:  # skipped: just let go of the meeting
            persist.apply_claimed(session, meeting_id, claimed, change, now)
        else:  # over before its room could be made: the rare path, through the ORM
            meeting = session.get(Meeting, meeting_id, populate_existing=True)
            assert meeting is not None
            apply(session, meeting, change, now, after)
    after.run()
    return result


def _record_attempt(
    session: Session,
    meeting_id: int,
    claimed: Row[Any],
    change: meetings.Change,
    now: datetime,
    identity: str,
    settings: Settings,
) -> Attempt:
    pending = session.execute(
        select(Room.id, Room.name_prefix)
        .where(Room.meeting_pk == meeting_id, Room.state == RoomState.PENDING)
        .order_by(col(Room.id))
        .limit(1)
    ).first()
    options = dict(claimed.room_options)
    caller_prefix = options.pop("room_name_prefix", None)
    end_date = lifecycle.end_date(claimed.room_end, settings)
    if pending is None:
        tag = deployment.new_tag()
        name_prefix = deployment.room_name_prefix(settings.room_prefix, identity, tag, caller_prefix)
        room_id = persist.add_attempt_room(session, meeting_id, tag, name_prefix, end_date, now)
        look_up_first = False
    else:
        # An earlier attempt's outcome is unknown: its room may exist. Look before creating.
        room_id, name_prefix = pending
        session.connection().execute(update(Room).where(col(Room.id) == room_id).values(end_date=end_date))
        look_up_first = True
    persist.apply_claimed(session, meeting_id, claimed, change, now)
    request = whereby.CreateMeetingRequest(end_date=end_date, room_name_prefix=name_prefix, **options)
    return Attempt(claimed.claim_token, room_id, claimed.booking_id, name_prefix, request, look_up_first)


def _make_room(attempt: Attempt) -> whereby.Meeting:
    client = whereby_calls.client()
    fields = attempt.request.fields or []
    if attempt.look_up_first:
        for found in client.list_meetings(room_name_prefix=attempt.name_prefix, fields=fields):
            log.info(
                "booking %s: adopted room %s made by an earlier attempt", attempt.booking_id, found.meeting_id
            )
            return found
    return client.create_meeting(attempt.request)


def _succeeded(
    meeting_id: int,
    attempt: Attempt,
    made: whereby.Meeting,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> str:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        journal.record_calls(session, attempt.booking_id, calls)
        meeting, room = session.execute(
            select(Meeting, Room)
            .join(Room, col(Room.meeting_pk) == col(Meeting.id))
            .where(col(Meeting.id) == meeting_id, col(Room.id) == attempt.room_id)
        ).one()
        found = replace(room_facts(room), end_date=made.end_date, whereby_id=made.meeting_id)
        change = meetings.room_made(
            meeting_facts(meeting),
            found,
            now,
            settings,
            holds=claims.holds(meeting, attempt.run),
            taken_over=meeting.claim_token is not None and not claims.holds(meeting, attempt.run),
        )
        if change.room.get("state") == RoomState.LIVE:
            persist.fill_room(room, made)
        apply(session, meeting, change, now, after, room)
    after.run()
    return change.outcome


def _failed(
    meeting_id: int,
    attempt: Attempt,
    error: whereby.WherebyError,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> str:
    now = utcnow()
    heed_rate_limit(error)
    if isinstance(error, whereby.AuthenticationError):
        log.error(
            "Whereby rejected the API key (401): check WHEREBY_API_KEY; booking %s waits", attempt.booking_id
        )
    else:
        log.warning("booking %s: creating the room failed: %s", attempt.booking_id, lifecycle.describe(error))
    after = AfterCommit()
    with session_scope() as session:
        journal.record_calls(session, attempt.booking_id, calls)
        meeting = session.get(Meeting, meeting_id, populate_existing=True)
        room = session.get(Room, attempt.room_id, populate_existing=True)
        assert meeting is not None and room is not None
        change = meetings.create_failed(
            meeting_facts(meeting),
            error,
            now,
            settings,
            holds=claims.holds(meeting, attempt.run),
            looked_up=attempt.look_up_first,
        )
        apply(session, meeting, change, now, after, room)
    after.run()
    return change.outcome
