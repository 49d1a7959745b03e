"""`POST /whereby/webhooks` (CONTRACT §4.3): signatures, replays, duplicates, order, foreign rooms,
and the overrun they drive, with the real worker on Redis, SQLite and PostgreSQL.

The webhooks here are signed by the test itself, from WHEREBY.md's words, so every delivery fault
(forged, replayed, repeated, late) is exact. tests/processes/test_overrun.py has the sandbox send them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlmodel import select

from tests.conftest import Events, apply_settings, call, iso, parse, soon, wait_for
from worker.devtools.sandbox import SandboxAdmin
from worker.faces.web.app import create_app
from worker.store import session_scope
from worker.store.models import WebhookEvent

SECRET = "whsec_test_secret"
OVERRUN = {
    "ROOMKEEPER_WHEREBY_WEBHOOK_SECRET": SECRET,
    "ROOMKEEPER_OVERRUN_MAX_SECONDS": "6",
    "ROOMKEEPER_REJOIN_GRACE_SECONDS": "1.5",
}


@pytest.fixture
def web(system: str) -> Iterator[TestClient]:
    apply_settings(**OVERRUN)
    with TestClient(create_app()) as client:
        yield client
    apply_settings(**{name: None for name in OVERRUN})


def sign(body: bytes, secret: str = SECRET, at: float | None = None) -> str:
    """Whereby-Signature: t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>.<raw body>"))."""
    stamp = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def envelope(kind: str, room: dict[str, Any], clients: int | None, at: datetime, event_id: str = "") -> bytes:
    data: dict[str, Any] = {"meetingId": room["meeting_id"], "roomName": room["room_name"], "subdomain": "x"}
    if clients is not None:
        data.update(numClients=clients, roleName="visitor", participantId=str(uuid.uuid4()))
    body = {
        "id": event_id or str(uuid.uuid4()),
        "apiVersion": "1.0",
        "createdAt": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": kind,
        "data": data,
    }
    return json.dumps(body).encode()


def post(web: TestClient, body: bytes, signature: str | None = None) -> Any:
    headers = {"Content-Type": "application/json", "Whereby-Signature": signature or sign(body)}
    return web.post("/whereby/webhooks", content=body, headers=headers)


def stored() -> int:
    with session_scope() as session:
        return int(session.execute(select(func.count()).select_from(WebhookEvent)).scalar_one())


def view(booking_id: str) -> dict[str, Any]:
    return dict(call("rooms.get_meeting", booking_id=booking_id))


def ready(booking_id: str, start_in: float, seconds: float, **extra: Any) -> dict[str, Any]:
    start = soon(start_in)
    call(
        "rooms.schedule_meeting",
        booking_id=booking_id,
        start=iso(start),
        end=iso(start + timedelta(seconds=seconds)),
        **extra,
    )
    return dict(wait_for(lambda: (v := view(booking_id))["state"] == "ready" and v))


def test_forged_and_replayed_webhooks_are_refused_and_change_nothing(web: TestClient) -> None:
    meeting = ready("hook-forged", 0.5, 30)
    body = envelope("room.client.joined", meeting["room"], 1, datetime.now(UTC))
    assert post(web, body, sign(body, secret="not-the-secret")).status_code == 401
    missing = web.post("/whereby/webhooks", content=body, headers={"Content-Type": "application/json"})
    assert missing.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    replayed = post(web, body, sign(body, at=time.time() - 301))
    assert replayed.status_code == 401 and "tolerance" in replayed.json()["detail"]
    tampered = body.replace(b'"numClients": 1', b'"numClients": 9')
    assert post(web, tampered, sign(body)).status_code == 401
    assert stored() == 0
    assert view("hook-forged")["occupancy"]["participants"] == 0


def test_a_signed_body_that_is_not_an_envelope_is_400_naming_the_field(web: TestClient) -> None:
    body = json.dumps(
        {"id": "x", "type": "room.client.joined", "createdAt": "yesterday", "data": {}}
    ).encode()
    answer = post(web, body)
    assert answer.status_code == 400 and answer.json()["errors"] == [
        {"field": "createdAt", "rule": "must be an ISO-8601 date-time"}
    ]
    assert stored() == 0


def test_duplicates_count_once_and_older_events_never_override_newer(web: TestClient, events: Events) -> None:
    meeting = ready("hook-order", 0.5, 30, notify={"task": "bookings.room_event", "queue": events.queue})
    room, t = meeting["room"], datetime.now(UTC)
    joined = envelope("room.client.joined", room, 1, t, event_id="evt-1")
    assert post(web, joined).json() == {"received": "evt-1", "duplicate": False}
    assert post(web, joined).json() == {"received": "evt-1", "duplicate": True}
    second = envelope("room.client.joined", room, 2, t + timedelta(seconds=1))
    assert post(web, second).status_code == 200
    wait_for(lambda: view("hook-order")["occupancy"]["participants"] == 2)
    # A "left" made before the second join, delivered after it: ignored.
    late = envelope("room.client.left", room, 0, t + timedelta(milliseconds=500))
    assert post(web, late).status_code == 200
    wait_for(lambda: _applied(late))
    occupancy = view("hook-order")["occupancy"]
    assert occupancy["participants"] == 2
    assert parse(occupancy["since"]) == t.replace(microsecond=t.microsecond // 1000 * 1000)  # first join
    assert stored() == 3
    assert wait_for(lambda: "room.occupied" in events.names()) and "room.empty" not in events.names()
    assert events.names().count("room.occupied") == 1


def _applied(body: bytes) -> bool:
    event_id = json.loads(body)["id"]
    with session_scope() as session:
        row = session.execute(
            select(WebhookEvent).where(WebhookEvent.event_id == event_id)
        ).scalar_one_or_none()
        return row is not None and row.applied_at is not None


def test_a_webhook_for_a_room_of_another_service_is_acknowledged_and_ignored(web: TestClient) -> None:
    foreign = {"meeting_id": "999000111", "room_name": "/someone-elses-room-2f3a"}
    body = envelope("room.client.joined", foreign, 1, datetime.now(UTC))
    assert post(web, body).status_code == 200
    wait_for(lambda: _applied(body))
    with session_scope() as session:
        row = session.execute(select(WebhookEvent)).scalar_one()
        assert row.outcome == "ignored: not a room of this deployment"


def test_overrun_held_while_inside_and_released_after_the_rejoin_grace(
    web: TestClient, sandbox: SandboxAdmin, events: Events
) -> None:
    meeting = ready("hook-overrun", 0.5, 2.5, notify={"task": "bookings.room_event", "queue": events.queue})
    room, end = meeting["room"], parse(meeting["end"])
    assert parse(room["end_date"]) == end + timedelta(seconds=6)  # covers the longest overrun
    assert post(web, envelope("room.client.joined", room, 1, datetime.now(UTC))).status_code == 200
    wait_for(lambda: view("hook-overrun")["occupancy"]["participants"] == 1)
    wait_for(lambda: "room.overrunning" in events.names(), timeout=8)
    time.sleep(1.0)
    (live,) = [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]]
    assert live["deleted_at"] is None and view("hook-overrun")["state"] == "ready"
    left_at = datetime.now(UTC)
    assert post(web, envelope("room.client.left", room, 0, left_at)).status_code == 200
    wait_for(lambda: view("hook-overrun")["state"] == "ended", timeout=8)
    (gone,) = [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]]
    deleted = parse(gone["deleted_at"])
    # Not before the rejoin grace (1.5 s), and promptly after it.
    assert left_at + timedelta(seconds=1.4) <= deleted <= left_at + timedelta(seconds=3)
    assert deleted < end + timedelta(seconds=6)
    names = events.names()
    assert names.index("room.occupied") < names.index("room.overrunning") < names.index("room.empty")
    assert names[-1] == "room.deleted"


def test_an_empty_room_is_deleted_at_its_end(web: TestClient, sandbox: SandboxAdmin) -> None:
    meeting = ready("hook-empty", 0.5, 2)
    room, end = meeting["room"], parse(meeting["end"])
    t = datetime.now(UTC)
    post(web, envelope("room.client.joined", room, 1, t))
    post(web, envelope("room.client.left", room, 0, t + timedelta(milliseconds=200)))
    wait_for(lambda: view("hook-empty")["state"] == "ended", timeout=8)
    (gone,) = [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]]
    assert end <= parse(gone["deleted_at"]) <= end + timedelta(seconds=1)


def test_the_cap_deletes_a_room_people_never_leave(web: TestClient, sandbox: SandboxAdmin) -> None:
    meeting = ready("hook-cap", 0.5, 1.5)
    room, end = meeting["room"], parse(meeting["end"])
    post(web, envelope("room.client.joined", room, 2, datetime.now(UTC)))  # their "left" is lost
    wait_for(lambda: view("hook-cap")["state"] == "ended", timeout=12)
    (gone,) = [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]]
    cap = end + timedelta(seconds=6)
    assert cap <= parse(gone["deleted_at"]) <= cap + timedelta(seconds=1)


def test_cancel_during_an_overrun_deletes_at_once(web: TestClient, sandbox: SandboxAdmin) -> None:
    meeting = ready("hook-cancel", 0.5, 1.5)
    room, end = meeting["room"], parse(meeting["end"])
    post(web, envelope("room.client.joined", room, 1, datetime.now(UTC)))
    wait_for(lambda: datetime.now(UTC) > end + timedelta(seconds=1), timeout=6)
    assert view("hook-cancel")["state"] == "ready"
    cancelled_at = datetime.now(UTC)
    assert call("rooms.cancel_meeting", booking_id="hook-cancel")["state"] == "cancelled"
    wait_for(lambda: all(r["deleted_at"] for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]))
    (gone,) = [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"]]
    assert parse(gone["deleted_at"]) <= cancelled_at + timedelta(seconds=1)


def test_reschedule_during_an_overrun_replaces_the_room_once_its_successor_is_ready(
    web: TestClient, sandbox: SandboxAdmin, events: Events
) -> None:
    meeting = ready("hook-move", 0.5, 1.5, notify={"task": "bookings.room_event", "queue": events.queue})
    room, end = meeting["room"], parse(meeting["end"])
    post(web, envelope("room.client.joined", room, 1, datetime.now(UTC)))
    wait_for(lambda: "room.overrunning" in events.names(), timeout=6)
    # They agree to go on for a while: the new end (and its overrun) is past this room's endDate.
    start = parse(meeting["start"])
    notify = {"task": "bookings.room_event", "queue": events.queue}
    call("rooms.schedule_meeting", booking_id="hook-move", start=iso(start), end=iso(soon(20)), notify=notify)
    moved = wait_for(
        lambda: (
            (v := view("hook-move"))["state"] == "ready"
            and v["room"]["meeting_id"] != room["meeting_id"]
            and v
        )
    )
    wait_for(lambda: "room.replaced" in events.names())
    old = wait_for(
        lambda: [r for r in sandbox.rooms() if r["meeting_id"] == room["meeting_id"] and r["deleted_at"]]
    )
    # The old room lived until its successor was ready, never beyond the old cap.
    assert parse(old[0]["deleted_at"]) <= end + timedelta(seconds=6.5)
    assert moved["occupancy"]["participants"] == 0
