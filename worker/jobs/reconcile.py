"""The reconciler: compares the store with the rooms Whereby holds and repairs the difference.

It touches only this deployment's rooms: those whose name carries its identity, and those made
before identities existed that the store knows. Every other room under the same prefix belongs to
another deployment on the same Whereby organisation and is only counted (`foreign`).

Repairs happen at the first pass that sees them, with no blanket grace, because the store proves
whether an attempt is in flight:
- a room of ours that no attempt recorded (its tag is unknown) is an orphan: every attempt stores
  its tag before it asks Whereby;
- the room of an attempt whose run no longer holds the meeting is adopted (or retired);
- a room the store holds live that the listing lacks is confirmed gone with one read before it is
  replaced (a listing that lags behind a creation must not cost a meeting its URLs).
The one race left is a creation in flight: the room of an attempt whose run still holds the
meeting is left to that run, which looks it up by its tag itself. A claim counts as held until
`CLOCK_SLACK` after its lease, for clock skew between hosts. (A deletion in flight needs no such
care: once the read has confirmed the room gone, whichever of the two records it first wins, and
the other changes nothing.)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from sqlmodel import Session, col, select

from config.settings import get_settings
from worker.adapters import whereby, whereby_calls
from worker.jobs.call_failures import heed_rate_limit
from worker.rules import meetings
from worker.store import deployment, journal, persist, session_scope
from worker.store.models import Meeting, Room, RoomState, utcnow
from worker.store.persist import AfterCommit, apply, meeting_facts, room_facts

log = logging.getLogger(__name__)

CLOCK_SLACK = meetings.EARLY_SLACK
RECONCILER = "(reconciler)"


def reconcile() -> dict[str, int]:
    settings = get_settings()
    started = utcnow()
    mine = deployment.identity()
    counts = {"listed": 0, "foreign": 0, "orphans_deleted": 0, "lost_rooms": 0, "adopted": 0, "retired": 0}
    prefix = f"{settings.room_prefix}-"
    with whereby_calls.recording_calls() as calls:
        try:
            listed = {m.meeting_id: m for m in whereby_calls.client().list_meetings(room_name_prefix=prefix)}
        except whereby.WherebyError as error:
            heed_rate_limit(error)
            log.warning("reconciler: listing Whereby's rooms failed, trying next time: %s", error)
            return counts
    counts["listed"] = len(listed)
    after = AfterCommit()
    orphans: list[tuple[str, str]] = []
    suspects: list[int] = []
    with session_scope() as session:
        journal.record_calls(session, RECONCILER, calls)
        by_id = (
            {
                room.whereby_id: room
                for room in session.execute(
                    select(Room).where(col(Room.whereby_id).in_(list(listed)))
                ).scalars()
            }
            if listed
            else {}
        )
        # A room the store does not know by id is ours only if its name carries our identity (or,
        # named before identities, a tag of ours): attempts whose reply was lost look like that.
        names = {}
        for whereby_id, found in listed.items():
            name = deployment.parse(found.room_name or "", settings.room_prefix)
            if name is not None and name.identity in (mine, None):
                names[whereby_id] = name
        tags = [name.tag for name in names.values()]
        by_tag = (
            {
                room.tag: room
                for room in session.execute(select(Room).where(col(Room.tag).in_(tags))).scalars()
            }
            if tags
            else {}
        )
        for whereby_id, found in listed.items():
            name = names.get(whereby_id)
            room = by_id.get(whereby_id)
            if room is None and name is not None:
                room = by_tag.get(name.tag)
                if room is not None and room.whereby_id is not None:
                    # A second room of one attempt (its POST landed after the retry's look-up
                    # found nothing): the attempt has its room already, so this one is an orphan.
                    orphans.append((whereby_id, _booking_of(session, room.meeting_pk)))
                    continue
            if room is None:
                if name is not None and name.identity == mine:
                    orphans.append((whereby_id, "(unknown)"))  # no attempt of ours recorded it
                else:
                    counts["foreign"] += 1  # another deployment's, or not named by this service
                continue
            if room.state == RoomState.LIVE:
                continue
            if room.state == RoomState.PENDING:
                outcome = _settle_attempt(session, room, found, started, after)
                if outcome in counts:
                    counts[outcome] += 1
                continue
            orphans.append((whereby_id, _booking_of(session, room.meeting_pk)))
        for room in session.execute(
            select(Room).where(
                Room.state == RoomState.LIVE,
                col(Room.ready_at) < started,
                col(Room.name_prefix).startswith(prefix),
            )
        ).scalars():
            if room.whereby_id not in listed and room.id is not None:
                suspects.append(room.id)
    counts["lost_rooms"] = _confirm_lost(suspects, after)
    _delete_orphans(orphans, counts)
    after.run()
    log.info("reconciled: %s", counts)
    return counts


def _held(row: Meeting | Room, now: datetime) -> bool:
    """A run (or a message on its way) holds this row: what it does is its own to finish."""
    return row.claim_until is not None and row.claim_until > now - CLOCK_SLACK


def _booking_of(session: Session, meeting_id: int) -> str:
    meeting = session.get(Meeting, meeting_id)
    return meeting.booking_id if meeting else "(unknown)"


def _settle_attempt(
    session: Session, room: Room, found: whereby.Meeting, now: datetime, after: AfterCommit
) -> str:
    """The room of an attempt whose reply was lost: adopt it if its meeting still waits for it,
    else retire it. Left alone while a run holds the meeting (it looks the room up itself)."""
    meeting = session.get(Meeting, room.meeting_pk)
    if meeting is None or _held(meeting, now):
        return "running"
    facts = replace(room_facts(room), end_date=found.end_date, whereby_id=found.meeting_id)
    change = meetings.attempt_adopted(meeting_facts(meeting), facts, now, get_settings())
    if change.room.get("state") == RoomState.LIVE:
        persist.fill_room(room, found)
    apply(session, meeting, change, now, after, room)
    if change.state is not None:
        return "adopted"
    journal.note(
        session, meeting.booking_id, "note", f"reconciler retires room {found.meeting_id}", meeting.state
    )
    return "retired"


def _confirm_lost(suspects: list[int], after: AfterCommit) -> int:
    """Rooms the listing lacks: one read each confirms they are gone before they are replaced."""
    lost = 0
    for room_id in suspects:
        with session_scope() as session:
            room = session.get(Room, room_id)
            if room is None or room.whereby_id is None:
                continue
            whereby_id = room.whereby_id
        with whereby_calls.recording_calls() as calls:
            try:
                whereby_calls.client().get_meeting(whereby_id)
                gone = False
            except whereby.NotFoundError:
                gone = True
            except whereby.WherebyError as error:
                heed_rate_limit(error)
                log.warning("reconciler: checking room %s failed, trying next time: %s", whereby_id, error)
                continue
        now = utcnow()
        with session_scope() as session:
            room = session.get(Room, room_id)
            assert room is not None
            meeting = session.get(Meeting, room.meeting_pk)
            assert meeting is not None
            journal.record_calls(session, meeting.booking_id, calls)
            if not gone or room.state != RoomState.LIVE:
                continue
            log.warning("booking %s: room %s is gone from Whereby", meeting.booking_id, whereby_id)
            apply(
                session,
                meeting,
                meetings.room_lost(meeting_facts(meeting), room_facts(room), now),
                now,
                after,
                room,
            )
            lost += 1
    return lost


def _delete_orphans(orphans: list[tuple[str, str]], counts: dict[str, int]) -> None:
    if not orphans:
        return
    deleted = []
    with whereby_calls.recording_calls() as calls:
        for whereby_id, booking in orphans:
            try:
                whereby_calls.client().delete_meeting(whereby_id)
            except whereby.WherebyError as error:
                heed_rate_limit(error)
                log.warning("reconciler: deleting orphan room %s failed: %s", whereby_id, error)
                continue
            counts["orphans_deleted"] += 1
            deleted.append((whereby_id, booking))
            log.warning("reconciler: deleted orphan room %s (%s)", whereby_id, booking)
    with session_scope() as session:
        journal.record_calls(session, RECONCILER, calls)
        for whereby_id, booking in deleted:
            journal.note(session, booking, "note", f"reconciler deleted orphan room {whereby_id}")
