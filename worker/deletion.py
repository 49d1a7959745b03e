"""Deleting a room on Whereby at its meeting's end (or when it is cancelled, replaced or unwanted).

Deletions never give up: they back off until Whereby confirms (204, or 404: already gone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from config.settings import Settings, get_settings
from worker import claims, journal, lifecycle, rules, runtime, whereby
from worker.errors import WherebyCallFailed, heed_rate_limit
from worker.models import Meeting, Room, utcnow
from worker.persist import AfterCommit, apply, meeting_facts, room_facts
from worker.store import session_scope

log = logging.getLogger(__name__)


def delete_room(room_pk: int, claim: str) -> str:
    """Delete the room on Whereby. Returns what happened; raises WherebyCallFailed when the call
    failed (the retry is already planned in the store), so Flower shows the failure."""
    settings = get_settings()
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        claimed = claims.take(session, Room, room_pk, claim, settings)
        if claimed is None:
            return "skipped: claim already taken (duplicate delivery)"
        run = claimed.claim_token
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk)
        assert meeting is not None
        change = rules.deletion_due(meeting_facts(meeting), room_facts(room), now)
        apply(session, meeting, change, now, after, room)
        booking_id, whereby_id, end_date = meeting.booking_id, room.whereby_id, room.end_date
    after.run()
    if not change.act:
        return change.outcome
    with runtime.recording_calls() as calls, claims.renewer.holding(Room, room_pk, run):
        try:
            gone = lifecycle.expired(end_date, now) or whereby_id is None
            existed = False if gone else runtime.client().delete_meeting(whereby_id or "")
        except whereby.WherebyError as error:
            outcome = _failed(room_pk, run, booking_id, error, calls, settings)
            raise WherebyCallFailed.from_error(error, booking_id, outcome) from None
    return _succeeded(room_pk, existed, calls)


def _succeeded(room_pk: int, existed: bool, calls: Sequence[whereby.CallRecord]) -> str:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        journal.record_calls(session, meeting.booking_id, calls)
        change = rules.room_deleted(meeting_facts(meeting), room_facts(room), now, existed=existed)
        apply(session, meeting, change, now, after, room)
    after.run()
    return change.outcome


def _failed(
    room_pk: int,
    run: str,
    booking_id: str,
    error: whereby.WherebyError,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> str:
    now = utcnow()
    heed_rate_limit(error)
    # The retry is sent as soon as this commits, with its ETA, not at the dispatcher's next tick:
    # a deletion must not wait up to a whole dispatch interval after a 429 or a 5xx.
    after = AfterCommit()
    with session_scope() as session:
        journal.record_calls(session, booking_id, calls)
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        change = rules.delete_failed(
            meeting_facts(meeting),
            room_facts(room),
            room.attempts,
            error,
            now,
            settings,
            holds=claims.holds(room, run),
        )
        apply(session, meeting, change, now, after, room)
        if change.room:
            level = (
                logging.ERROR
                if room.attempts >= settings.max_attempts or isinstance(error, whereby.AuthenticationError)
                else logging.WARNING
            )
            log.log(
                level,
                "booking %s: deleting room %s failed (attempt %d): %s",
                booking_id,
                room.whereby_id,
                room.attempts,
                change.outcome,
            )
    after.run()
    return change.outcome
