"""What happened, written down: history lines, the meeting view, and events queued in the outbox."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

from config.settings import get_settings
from worker.adapters import metrics, whereby
from worker.adapters.signing import shown_url
from worker.rules.lifecycle import fmt
from worker.store.models import (
    DeliveryState,
    EventDelivery,
    History,
    Meeting,
    Outbox,
    Room,
    RoomState,
    utcnow,
)

log = logging.getLogger(__name__)

# History and outbox rows are only ever appended. A transaction gathers them and writes each
# table's rows in one INSERT just before it commits, instead of one ORM object apiece: the unit of
# work's bookkeeping was the largest CPU cost of a room creation.
APPENDED = "roomkeeper.appended"  # session.info key: {model: [row, ...]} to insert at commit


def _append(
    session: Session, model: type[History] | type[Outbox] | type[EventDelivery], row: dict[str, Any]
) -> None:
    session.info.setdefault(APPENDED, {}).setdefault(model, []).append(row)


def install() -> None:
    """Write the gathered rows before every commit (called by worker.runtime.process.start)."""
    if not event.contains(OrmSession, "before_commit", _insert_appended):
        event.listen(OrmSession, "before_commit", _insert_appended)


def _insert_appended(session: OrmSession) -> None:
    appended = session.info.pop(APPENDED, None)
    if appended:
        connection = session.connection()
        for model, rows in appended.items():
            connection.execute(insert(model), rows)


def note(session: Session, booking_id: str, kind: str, action: str, outcome: str = "") -> None:
    _append(
        session,
        History,
        {"at": utcnow(), "booking_id": booking_id, "kind": kind, "action": action[:120], "outcome": outcome},
    )


def note_state(session: Session, booking_id: str, was: str, state: str, why: str) -> None:
    note(session, booking_id, "state", f"{was} -> {state}", why)
    log.info("booking %s: %s -> %s %s", booking_id, was, state, why)


def record_calls(session: Session, booking_id: str, calls: Iterable[whereby.CallRecord]) -> None:
    metrics.record_calls(calls := list(calls))  # counted for /metrics whichever process serves it
    for call in calls:
        outcome = str(call.status) if call.status is not None else (call.error or "error")
        target = f" {call.meeting_id}" if call.meeting_id else ""
        note(
            session,
            booking_id,
            "whereby",
            f"{call.method} {call.path}{target}",
            f"{outcome} in {call.elapsed:.3f}s",
        )


def view(meeting: Meeting, room: Room | None) -> dict[str, Any]:
    """The meeting view of CONTRACT §2.4."""
    room_view = None
    if room is not None and room.state == RoomState.LIVE:
        room_view = {
            "meeting_id": room.whereby_id,
            "room_name": room.room_name,
            "room_url": room.room_url,
            "host_room_url": room.host_room_url,
            "viewer_room_url": room.viewer_room_url,
            "end_date": fmt(room.end_date),
        }
    occupancy = None
    if room_view is not None and room is not None and get_settings().webhooks_enabled:
        # Whereby's webhooks tell every join: a room none was received for is empty.
        occupancy = {
            "participants": room.participants or 0,
            "since": fmt(room.occupancy_since or room.ready_at),
        }
    return {
        "booking_id": meeting.booking_id,
        "state": meeting.state,
        "start": fmt(meeting.start),
        "end": fmt(meeting.end),
        "room": room_view,
        "occupancy": occupancy,
        "metadata": meeting.meta,
        "last_error": meeting.last_error,
        "created_at": fmt(meeting.created_at),
        "updated_at": fmt(meeting.updated_at),
    }


def emit(session: Session, meeting: Meeting, room: Room | None, event: str, now: datetime) -> bool:
    """Queue an event for the caller's notify; it leaves only once this transaction commits.

    Returns whether an outbox row was queued (so the commit should be followed by a flush)."""
    url = meeting.notify.get("url") if meeting.notify else None
    if not url:
        note(session, meeting.booking_id, "event", event)
    if not meeting.notify:
        return False
    kwargs = {
        "event": event,
        "booking_id": meeting.booking_id,
        "meeting": view(meeting, room),
        "occurred_at": fmt(now),
    }
    if url:
        # A notify URL: the delivery row holds the event and its signed POST's retries; the
        # outbox row, sent after commit like any event, wakes the booking's delivery task.
        row = delivery_row(meeting.booking_id, event, url, kwargs, now)
        _append(session, EventDelivery, row)
        note(
            session,
            meeting.booking_id,
            "event",
            event,
            f"for {shown_url(url)}, delivery {row['delivery_id']}",
        )
        task, queue, kwargs = DELIVER_TASK, get_settings().queue, {"booking_id": meeting.booking_id}
    else:
        task, queue = meeting.notify["task"], meeting.notify["queue"]
    _append(
        session,
        Outbox,
        {
            "created_at": now,
            "booking_id": meeting.booking_id,
            "task": task,
            "queue": queue,
            "kwargs": kwargs,
            "pending": True,
        },
    )
    return True


# The task that POSTs a booking's events to its notify URL (tasks/events.py).
DELIVER_TASK = "rooms.deliver_events"


def delivery_row(
    booking_id: str, event: str, url: str, kwargs: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "delivery_id": str(uuid.uuid4()),
        "booking_id": booking_id,
        "event": event,
        "url": url,
        # Serialised once: every attempt sends (and signs) the very same bytes.
        "body": json.dumps(kwargs, separators=(",", ":")),
        "created_at": now,
        "due_at": now,
        "pending": True,
        "state": DeliveryState.PENDING,
        "attempts": 0,
    }
