"""Who is in each room, from Whereby's webhooks (CONTRACT §4.3): received, stored, then applied.

The web process verifies a webhook's signature, stores the event (its id is unique, so a repeated
delivery is stored once) and asks a worker to apply it; it answers well inside Whereby's 5 s. A
worker applies a room's unapplied events in the order Whereby made them; `meetings.occupancy_changed`
decides what each means, and ignores an event older than the newest one applied. Beat's sweep
applies what a lost message left behind, and the deletion of a room applies its pending events
before deciding, so a deletion never acts on a count older than what was received.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from config.settings import Settings, get_settings
from worker.adapters import signing
from worker.adapters.signing import BadSignature as BadSignature  # the web face refuses with it
from worker.rules import meetings
from worker.rules.validation import parse_instant
from worker.runtime import resources
from worker.store import deployment, session_scope
from worker.store.models import Meeting, Room, WebhookEvent, utcnow
from worker.store.persist import AfterCommit, apply, meeting_facts, room_facts

log = logging.getLogger(__name__)

# Whereby's signature timestamps older (or further ahead) than this are refused: a replay (the
# webhook is not Whereby's: answered 401, nothing changes).
SIGNATURE_TOLERANCE = timedelta(minutes=5)
CLIENT_EVENTS = frozenset({"room.client.joined", "room.client.left"})
SESSION_EVENTS = frozenset({"room.session.started", "room.session.ended"})
# An event for a room named like ours but not (yet) in the store may precede the create's reply
# being stored; it waits this long before it is dropped as not ours.
UNKNOWN_ROOM_PATIENCE = timedelta(minutes=10)
# Applied events are kept this long (duplicates arriving later are still recognised), then pruned
# by beat's sweep, at most once every PRUNE_EVERY.
KEEP_APPLIED = timedelta(days=2)
PRUNE_EVERY = timedelta(minutes=10)


class _Pruned:
    at: datetime | None = None  # per process, owned by worker.runtime.resources


class BadEvent(ValueError):
    """A signed body that is not a webhook envelope; the message names the field."""


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    created_at: datetime
    whereby_id: str | None
    room_name: str | None
    num_clients: int | None


HEADER = "Whereby-Signature"


def signature_fields(header: str | None) -> tuple[str, list[str]]:
    """The timestamp and the v1 signatures of a `Whereby-Signature` header, or BadSignature for a
    header of any other shape (never another error: the caller is not yet authenticated)."""
    return signing.signature_fields(header, HEADER)


def verify(raw: bytes, header: str | None, secret: str, now: datetime) -> None:
    """Check `Whereby-Signature: t=<unix>,v1=<hex>` over the raw body (`worker/adapters/signing.py`)."""
    signing.verify(
        secret, raw, header, now.timestamp(), name=HEADER, tolerance=SIGNATURE_TOLERANCE.total_seconds()
    )


def parse(raw: bytes) -> Event:
    """The fields of a verified envelope that matter here."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadEvent("body: not JSON (or nested too deep)") from None
    if not isinstance(body, dict):
        raise BadEvent("body: must be a JSON object")

    def text(name: str, value: Any, limit: int) -> str:
        if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
            raise BadEvent(f"{name}: must be a string of 1 to {limit} characters")
        return value

    data = body.get("data")
    if not isinstance(data, dict):
        raise BadEvent("data: must be an object")
    try:
        created_at = parse_instant(text("createdAt", body.get("createdAt"), 64))
    except ValueError:
        raise BadEvent("createdAt: must be an ISO-8601 date-time") from None
    count = data.get("numClients")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise BadEvent("data.numClients: must be a non-negative integer")
    meeting_id = data.get("meetingId")
    room_name = data.get("roomName")
    return Event(
        id=text("id", body.get("id"), 200),
        type=text("type", body.get("type"), 64),
        created_at=created_at,
        whereby_id=None if meeting_id is None else text("data.meetingId", str(meeting_id), 64),
        room_name=None if room_name is None else text("data.roomName", room_name, 255),
        num_clients=count,
    )


def store(event: Event, now: datetime) -> bool:
    """Keep the event for a worker; False when its id was seen before (a repeated delivery)."""
    try:
        with session_scope() as session:
            session.add(
                WebhookEvent(
                    event_id=event.id,
                    type=event.type,
                    created_at=event.created_at,
                    received_at=now,
                    whereby_id=event.whereby_id,
                    room_name=event.room_name,
                    num_clients=event.num_clients,
                    # Nothing to apply an event without a room to: kept only to count it once.
                    applied_at=now if event.whereby_id is None else None,
                    outcome="ignored: no meetingId" if event.whereby_id is None else None,
                )
            )
    except IntegrityError:
        return False
    return True


def apply_room_events(whereby_id: str) -> str:
    """Apply the unapplied events of one Whereby room (the worker's task, and beat's sweep)."""
    settings = get_settings()
    ours = deployment.identity()  # read before the transaction opens: it reads the store too
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        room = (
            session.execute(
                select(Room)
                .where(col(Room.whereby_id) == whereby_id)
                .order_by(col(Room.id))
                .with_for_update()
            )
            .scalars()
            .first()
        )
        if room is None:
            return _unknown_room(session, whereby_id, ours, now, settings)
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        applied = apply_pending(session, meeting, room, now, after, settings)
    after.run()
    return f"applied {applied} event(s)"


def apply_pending(
    session: Session, meeting: Meeting, room: Room, now: datetime, after: AfterCommit, settings: Settings
) -> int:
    """Apply, in Whereby's order, the events received for `room` that no one applied yet."""
    if room.whereby_id is None:
        return 0
    events = (
        session.execute(
            select(WebhookEvent)
            .where(col(WebhookEvent.whereby_id) == room.whereby_id, col(WebhookEvent.applied_at).is_(None))
            .order_by(col(WebhookEvent.created_at), col(WebhookEvent.id))
        )
        .scalars()
        .all()
    )
    grace = timedelta(seconds=settings.rejoin_grace_seconds)
    for event in events:
        if event.type in CLIENT_EVENTS and event.num_clients is not None:
            change = meetings.occupancy_changed(
                meeting_facts(meeting),
                room_facts(room),
                event.num_clients,
                event.created_at,
                now,
                rejoin_grace=grace,
            )
            apply(session, meeting, change, now, after, room)
            event.outcome = change.outcome[:200]
        else:
            event.outcome = "noted" if event.type in SESSION_EVENTS else f"ignored: {event.type} not used"
        event.applied_at = now
    return len(events)


def _unknown_room(session: Session, whereby_id: str, ours: str, now: datetime, settings: Settings) -> str:
    events = (
        session.execute(
            select(WebhookEvent).where(
                col(WebhookEvent.whereby_id) == whereby_id, col(WebhookEvent.applied_at).is_(None)
            )
        )
        .scalars()
        .all()
    )
    waiting = 0
    for event in events:
        name = deployment.parse(event.room_name or "", settings.room_prefix)
        named_ours = name is not None and name.identity == ours
        if named_ours and event.received_at > now - UNKNOWN_ROOM_PATIENCE:
            waiting += 1  # its room's create reply may not be stored yet
            continue
        event.applied_at = now
        event.outcome = "ignored: not a room of this deployment"
    return f"no room {whereby_id} here: {len(events) - waiting} ignored, {waiting} waiting"


def sweep(settle: timedelta = timedelta(seconds=2)) -> int:
    """Beat's pass: apply what a lost or late message left unapplied; prune old applied events."""
    now = utcnow()
    with session_scope() as session:
        ids = (
            session.execute(
                select(WebhookEvent.whereby_id)
                .where(col(WebhookEvent.applied_at).is_(None), col(WebhookEvent.received_at) < now - settle)
                .distinct()
                .limit(500)
            )
            .scalars()
            .all()
        )
    _prune(now)
    for whereby_id in ids:
        if whereby_id is not None:
            try:
                apply_room_events(whereby_id)
            except Exception:
                log.exception("applying the webhooks of room %s failed", whereby_id)
    return len(ids)


def _prune(now: datetime) -> None:
    pruned = resources.own("webhook pruning", _Pruned)
    if pruned.at is not None and now - pruned.at < PRUNE_EVERY:
        return
    pruned.at = now
    with session_scope() as session:
        session.execute(delete(WebhookEvent).where(col(WebhookEvent.applied_at) < now - KEEP_APPLIED))
