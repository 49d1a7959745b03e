"""Deleting a room on Whereby at its meeting's end (or when it is cancelled, replaced or unwanted).

Deletions never give up: they back off until Whereby confirms (204, or 404: already gone). With an
overrun allowed, a meeting's room is not deleted at its end while people are inside (CONTRACT §4.3):
the count comes from Whereby's webhooks (`worker/jobs/occupancy.py`), or, without them, from asking
Whereby's insights whether a session is going on; `worker/rules/meetings.py` decides either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from config.settings import Settings, get_settings
from worker.adapters import metrics, whereby, whereby_calls
from worker.jobs import occupancy
from worker.jobs.call_failures import WherebyCallFailed, heed_rate_limit
from worker.rules import lifecycle, meetings
from worker.store import claims, journal, session_scope
from worker.store.models import Meeting, Room, utcnow
from worker.store.persist import AfterCommit, apply, meeting_facts, room_facts

log = logging.getLogger(__name__)


def delete_room(room_id: int, claim: str) -> str:
    """Delete the room on Whereby. Returns what happened; raises WherebyCallFailed when the call
    failed (the retry is already planned in the store), so Flower shows the failure."""
    settings = get_settings()
    now = utcnow()
    after = AfterCommit()
    with claims.message(Room, room_id, claim), session_scope() as session:
        claimed = claims.take(session, Room, room_id, settings)
        if claimed is None:
            return claims.NOTHING_TO_DO
        run = claimed.claim_token
        room = session.get(Room, room_id, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk)
        assert meeting is not None
        # Every webhook received so far counts before deciding: a join stored a moment ago holds it.
        occupancy.apply_pending(session, meeting, room, now, after, settings)
        change = meetings.deletion_due(
            meeting_facts(meeting), room_facts(room), now, webhooks=settings.webhooks_enabled
        )
        apply(session, meeting, change, now, after, room)
        booking_id, whereby_id, end_date = meeting.booking_id, room.whereby_id, room.end_date
        room_name, due_at = room.room_name, room.due_at
    after.run()
    if not change.act:
        return change.outcome
    with whereby_calls.recording_calls() as calls, claims.renewer.holding(Room, room_id, run):
        if change.probe:
            outcome = _probe(room_id, run, booking_id, room_name, calls, settings)
            if outcome is not None:
                return outcome
        try:
            gone = lifecycle.expired(end_date, now) or whereby_id is None
            existed = False if gone else whereby_calls.client().delete_meeting(whereby_id or "")
        except whereby.WherebyError as error:
            outcome = _failed(room_id, run, booking_id, error, calls, settings)
            raise WherebyCallFailed.from_error(error, booking_id, outcome) from None
    return _succeeded(room_id, existed, calls, due_at)


def _probe(
    room_id: int,
    run: str,
    booking_id: str,
    room_name: str | None,
    calls: list[whereby.CallRecord],
    settings: Settings,
) -> str | None:
    """Ask Whereby whether the room's session goes on (no webhooks). None: go on and delete."""
    ongoing, last_ended, failure = False, None, None
    try:
        sessions = whereby_calls.client().room_sessions(room_name or "") if room_name else []
        ongoing = any(found.ended_at is None and found.started_at is not None for found in sessions)
        ends = [found.ended_at for found in sessions if found.ended_at is not None]
        last_ended = max(ends) if ends else None
    except whereby.WherebyError as error:
        heed_rate_limit(error)
        failure = error
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        journal.record_calls(session, booking_id, calls)
        room = session.get(Room, room_id, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        if not claims.holds(room, run):
            return "claim lost while asking Whereby about the room's session"
        facts, room_now = meeting_facts(meeting), room_facts(room)
        if failure is not None:
            retry_at = lifecycle.after_delete_error(failure, 1, now, settings)
            change = meetings.probe_failed(facts, room_now, now, retry_at, lifecycle.describe(failure))
        else:
            change = meetings.session_probed(
                facts,
                room_now,
                now,
                ongoing=ongoing,
                last_ended=last_ended,
                poll=timedelta(seconds=settings.overrun_poll_seconds),
                rejoin_grace=timedelta(seconds=settings.rejoin_grace_seconds),
            )
        apply(session, meeting, change, now, after, room)
    calls.clear()
    after.run()
    return None if change.act else change.outcome


def _succeeded(
    room_id: int, existed: bool, calls: Sequence[whereby.CallRecord], due_at: datetime | None
) -> str:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        room = session.get(Room, room_id, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        journal.record_calls(session, meeting.booking_id, calls)
        change = meetings.room_deleted(meeting_facts(meeting), room_facts(room), now, existed=existed)
        apply(session, meeting, change, now, after, room)
    after.run()
    if due_at is not None:
        metrics.observe_deletion_lag(max(0.0, (now - due_at).total_seconds()))
    return change.outcome


def _failed(
    room_id: int,
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
        room = session.get(Room, room_id, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        change = meetings.delete_failed(
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
