"""The lifecycle end to end: a real worker on the real Redis, the sandbox, SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.conftest import Events, call, iso, parse, soon, wait_for
from worker.devtools.sandbox import SandboxAdmin

pytestmark = pytest.mark.usefixtures("system")


def book(
    booking_id: str, start_in: float, minutes: float = 0, seconds: float = 0, **extra: Any
) -> dict[str, Any]:
    start = soon(start_in)
    end = start + timedelta(minutes=minutes, seconds=seconds)
    return call("rooms.schedule_meeting", booking_id=booking_id, start=iso(start), end=iso(end), **extra)


def state_of(booking_id: str) -> str:
    return call("rooms.get_meeting", booking_id=booking_id)["state"]


def rooms_of(sandbox: SandboxAdmin, view_room_ids: set[str]) -> list[dict[str, Any]]:
    return [r for r in sandbox.rooms() if r["meeting_id"] in view_room_ids]


def test_happy_path_room_before_start_and_deleted_at_end(sandbox: SandboxAdmin, events: Events) -> None:
    view = book(
        "happy-1",
        start_in=2.5,
        seconds=2.5,
        notify={"task": "bookings.room_event", "queue": events.queue},
        room={"room_mode": "group", "fields": ["hostRoomUrl"]},
        metadata={"patient": 7},
    )
    assert view["state"] == "scheduled"
    assert view["room"] is None
    assert view["metadata"] == {"patient": 7}
    start, end = parse(view["start"]), parse(view["end"])

    ready = wait_for(lambda: (v := call("rooms.get_meeting", booking_id="happy-1"))["state"] == "ready" and v)
    assert ready["room"]["host_room_url"] and "roomKey=" in ready["room"]["host_room_url"]
    assert ready["room"]["viewer_room_url"] is None
    assert parse(ready["room"]["end_date"]) == end

    wait_for(lambda: state_of("happy-1") == "ended", timeout=10)
    (room,) = sandbox.rooms()
    assert room["meeting_id"] == ready["room"]["meeting_id"]
    created, deleted = parse(room["created_at"]), parse(room["deleted_at"])
    # Created one lead time (1 s) before the start, not later; deleted at the end, not an interval later.
    assert start - timedelta(seconds=1.5) <= created <= start
    assert room["deleted_by"] == "api"
    assert end <= deleted <= end + timedelta(seconds=1)
    assert call("rooms.get_meeting", booking_id="happy-1")["room"] is None

    got = wait_for(lambda: len(events.drain()) >= 2 and events.seen)
    assert [e["event"] for e in got] == ["room.ready", "room.deleted"]
    assert all(e["_task"] == "bookings.room_event" and e["booking_id"] == "happy-1" for e in got)
    assert got[0]["meeting"]["state"] == "ready"
    assert got[0]["meeting"]["room"]["meeting_id"] == room["meeting_id"]
    assert got[1]["meeting"]["state"] == "ended"
    assert set(got[0]) == {"event", "booking_id", "meeting", "occurred_at", "_task"}


def test_cancel_before_the_room_exists_makes_no_room(sandbox: SandboxAdmin) -> None:
    book("cancel-early", start_in=600, minutes=30)
    view = call("rooms.cancel_meeting", booking_id="cancel-early")
    assert view["state"] == "cancelled"
    assert call("rooms.cancel_meeting", booking_id="cancel-early")["state"] == "cancelled"  # again: no error
    assert sandbox.rooms() == []
    assert not [c for c in sandbox.calls() if c["method"] == "POST"]


def test_cancel_after_the_room_exists_deletes_it_now(sandbox: SandboxAdmin, events: Events) -> None:
    book(
        "cancel-late", start_in=0.5, minutes=30, notify={"task": "bookings.room_event", "queue": events.queue}
    )
    wait_for(lambda: state_of("cancel-late") == "ready")
    cancelled_at = soon(0)
    view = call("rooms.cancel_meeting", booking_id="cancel-late")
    assert view["state"] == "cancelled"
    room = wait_for(lambda: [r for r in sandbox.rooms() if r["deleted_at"]])[0]
    assert room["deleted_by"] == "api"
    assert parse(room["deleted_at"]) - cancelled_at < timedelta(seconds=2)
    assert wait_for(lambda: events.names() == ["room.ready", "room.deleted"])
    assert state_of("cancel-late") == "cancelled"


def test_reschedule_within_the_room_end_keeps_room_and_urls(sandbox: SandboxAdmin) -> None:
    first = book("keep-1", start_in=0.5, seconds=30)
    wait_for(lambda: state_of("keep-1") == "ready")
    before = call("rooms.get_meeting", booking_id="keep-1")["room"]
    new_end = parse(first["start"]) + timedelta(seconds=3)
    view = call(
        "rooms.schedule_meeting",
        booking_id="keep-1",
        start=first["start"],
        end=iso(new_end),
        room={"room_mode": "group"},
    )  # a changed room object alone does not replace the room
    assert view["room"] == before
    wait_for(lambda: state_of("keep-1") == "ended", timeout=10)
    (room,) = sandbox.rooms()
    assert room["meeting_id"] == before["meeting_id"]
    assert new_end <= parse(room["deleted_at"]) <= new_end + timedelta(seconds=1)


def test_reschedule_past_the_room_end_replaces_the_room(sandbox: SandboxAdmin, events: Events) -> None:
    first = book(
        "replace-1", start_in=0.5, seconds=20, notify={"task": "bookings.room_event", "queue": events.queue}
    )
    wait_for(lambda: state_of("replace-1") == "ready")
    old = call("rooms.get_meeting", booking_id="replace-1")["room"]
    later_end = parse(first["end"]) + timedelta(seconds=20)
    call(
        "rooms.schedule_meeting",
        booking_id="replace-1",
        start=first["start"],
        end=iso(later_end),
        notify={"task": "bookings.room_event", "queue": events.queue},
    )
    new = wait_for(
        lambda: (
            (v := call("rooms.get_meeting", booking_id="replace-1"))["room"]
            and v["room"]["meeting_id"] != old["meeting_id"]
            and v["room"]
        )
    )
    assert new["room_url"] != old["room_url"]
    assert parse(new["end_date"]) == later_end
    wait_for(lambda: any(r["meeting_id"] == old["meeting_id"] and r["deleted_at"] for r in sandbox.rooms()))
    live = [r for r in sandbox.rooms() if r["live"]]
    assert [r["meeting_id"] for r in live] == [new["meeting_id"]]
    assert wait_for(lambda: "room.replaced" in events.names())
    assert events.names() == ["room.ready", "room.replaced"]
    assert events.seen[1]["meeting"]["room"]["meeting_id"] == new["meeting_id"]


BAD_CALLS = [
    ({"start": "2030-01-01T10:00:00Z", "end": "2030-01-01T11:00:00Z"}, "booking_id", "required"),
    (
        {"booking_id": "", "start": "2030-01-01T10:00:00Z", "end": "2030-01-01T11:00:00Z"},
        "booking_id",
        "at least 1",
    ),
    (
        {"booking_id": "x" * 201, "start": "2030-01-01T10:00:00Z", "end": "2030-01-01T11:00:00Z"},
        "booking_id",
        "200",
    ),
    ({"booking_id": "b", "start": "tomorrow", "end": "2030-01-01T11:00:00Z"}, "start", "ISO-8601"),
    (
        {"booking_id": "b", "start": "2030-01-01T10:00:00Z", "end": "2030-01-01T09:00:00Z"},
        "end",
        "after start",
    ),
    ({"booking_id": "b", "start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00Z"}, "end", "future"),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "room": {"room_name_prefix": "Bad Prefix"},
        },
        "room.room_name_prefix",
        "pattern",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "room": {"room_name_prefix": "a" * 30},
        },
        "room.room_name_prefix",
        "at most",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "room": {"room_mode": "huge"},
        },
        "room.room_mode",
        "normal",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "room": {"fields": ["secretUrl"]},
        },
        "room.fields",
        "hostRoomUrl",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "notify": {"task": "x"},
        },
        "notify.queue",
        "required",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "metadata": {"blob": "x" * 5000},
        },
        "metadata",
        "4096",
    ),
    (
        {
            "booking_id": "b",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T11:00:00Z",
            "priority": "high",
        },
        "priority",
        "unknown field",
    ),
]


@pytest.mark.parametrize(("kwargs", "field", "rule"), BAD_CALLS, ids=[f"{c[1]}-{c[2]}" for c in BAD_CALLS])
def test_bad_input_fails_at_once_naming_the_field(
    sandbox: SandboxAdmin, kwargs: dict[str, Any], field: str, rule: str
) -> None:
    result = __import__("worker.runtime.app", fromlist=["app"]).app.send_task(
        "rooms.schedule_meeting", queue="rooms", kwargs=kwargs
    )
    with pytest.raises(Exception) as caught:
        result.get(timeout=10)
    assert not isinstance(caught.value, CeleryTimeout)
    message = str(caught.value)
    assert field in message and rule in message
    assert type(caught.value).__name__ == "InvalidRequest"
    assert result.state == "FAILURE"
    # Nothing stored, nothing sent to Whereby, and the worker goes on serving.
    booking_id = kwargs.get("booking_id")
    if isinstance(booking_id, str) and 0 < len(booking_id) <= 200:
        with pytest.raises(Exception, match="no meeting with booking_id"):
            call("rooms.get_meeting", booking_id=booking_id)
    assert sandbox.calls() == []
    assert book("still-serving", start_in=600, minutes=5)["state"] == "scheduled"


def test_unknown_booking_and_positional_arguments_are_errors() -> None:
    with pytest.raises(Exception, match="booking_id: no meeting with booking_id 'nobody'"):
        call("rooms.cancel_meeting", booking_id="nobody")
    from worker.runtime.app import app

    with pytest.raises(Exception, match="keyword arguments"):
        app.send_task("rooms.get_meeting", args=["x"], queue="rooms").get(timeout=10)


def test_server_errors_then_success_make_one_room(sandbox: SandboxAdmin) -> None:
    sandbox.script(
        {"method": "POST", "action": "error", "status": 503},
        {"method": "POST", "action": "error", "status": 500},
    )
    book("flaky-1", start_in=1, seconds=30)
    view = wait_for(lambda: (v := call("rooms.get_meeting", booking_id="flaky-1"))["state"] == "ready" and v)
    statuses = [c["status"] for c in sandbox.calls() if c["method"] == "POST"]
    assert statuses == [503, 500, 201]
    assert [r["meeting_id"] for r in sandbox.rooms()] == [view["room"]["meeting_id"]]


def test_lost_reply_is_looked_up_not_duplicated(sandbox: SandboxAdmin) -> None:
    sandbox.script({"method": "POST", "action": "lost_reply"})
    book("lost-1", start_in=0.5, seconds=30)
    view = wait_for(lambda: (v := call("rooms.get_meeting", booking_id="lost-1"))["state"] == "ready" and v)
    rooms = sandbox.rooms()
    assert len(rooms) == 1, rooms  # the room made before the reply was lost was adopted
    assert rooms[0]["meeting_id"] == view["room"]["meeting_id"]
    assert [c["method"] for c in sandbox.calls()] == ["POST", "GET"]


def test_rate_limited_create_waits_retry_after_and_keeps_the_meeting(sandbox: SandboxAdmin) -> None:
    sandbox.script({"method": "POST", "action": "rate_limit", "retry_after": 2})
    book("limited-1", start_in=0.5, seconds=30)
    wait_for(lambda: state_of("limited-1") == "ready", timeout=15)
    posts = [c for c in sandbox.calls() if c["method"] == "POST"]
    assert [c["status"] for c in posts] == [429, 201]
    assert parse(posts[1]["at"]) - parse(posts[0]["at"]) >= timedelta(seconds=2)
    assert len(sandbox.rooms()) == 1


def test_sustained_failure_ends_failed_with_event(sandbox: SandboxAdmin, events: Events) -> None:
    sandbox.set_faults(error_rate=1.0)
    # Attempts are not counted out (ROOMKEEPER_MAX_ATTEMPTS is 4 here): the meeting is tried again
    # every second or two until its end has passed without a room.
    book("doomed-1", start_in=0.5, seconds=6, notify={"task": "bookings.room_event", "queue": events.queue})
    view = wait_for(
        lambda: (v := call("rooms.get_meeting", booking_id="doomed-1"))["state"] == "failed" and v, timeout=30
    )
    assert "no room could be made before the meeting ended" in view["last_error"]
    # (after a 5xx each attempt first looks for a room the last one may have made)
    attempts = [c for c in sandbox.calls() if c["path"] == "/v1/meetings"]
    assert len(attempts) > 4
    assert wait_for(lambda: events.names() == ["room.failed"])
    assert events.seen[0]["meeting"]["state"] == "failed"


def test_same_create_delivered_twice_makes_one_room(sandbox: SandboxAdmin) -> None:
    from sqlmodel import select

    from worker.jobs import dispatch
    from worker.runtime.app import app
    from worker.store import claims, session_scope
    from worker.store.models import Meeting

    book("twice-1", start_in=3600, minutes=30)
    with session_scope() as session:
        meeting = session.exec(select(Meeting).where(Meeting.booking_id == "twice-1")).one()
        meeting.due_at = soon(0)
        session.flush()
        (claimed,) = dispatch.claim_due(
            session, Meeting, soon(0), soon(1), {meeting.id}, 10, timedelta(seconds=60)
        )
    results = [
        app.send_task(
            "rooms.create_room", kwargs={"meeting_pk": claimed.pk, "claim": claimed.claim}, queue="rooms"
        )
        for _ in range(2)
    ]
    outcomes = sorted(r.get(timeout=15) for r in results)
    assert outcomes[1] == claims.NOTHING_TO_DO
    assert outcomes[0].startswith("room.ready")
    assert len(sandbox.rooms()) == 1
    assert len([c for c in sandbox.calls() if c["method"] == "POST"]) == 1


def test_meeting_due_while_nothing_ran_gets_its_room_at_once(sandbox: SandboxAdmin) -> None:
    """A meeting stored before an outage, whose creation time passed while no process ran."""
    from worker.store import session_scope
    from worker.store.models import Meeting, MeetingState, utcnow

    now = utcnow()
    with session_scope() as session:
        session.add(
            Meeting(
                booking_id="overdue-1",
                state=MeetingState.SCHEDULED,
                start=now + timedelta(seconds=5),
                end=now + timedelta(minutes=5),
                create_at=now - timedelta(hours=3),
                room_end=now + timedelta(minutes=5),
                due_at=now - timedelta(hours=3),
                created_at=now,
                updated_at=now,
            )
        )
    wait_for(lambda: state_of("overdue-1") == "ready", timeout=5)
    assert len(sandbox.rooms()) == 1


def test_the_api_key_appears_nowhere(
    sandbox_server: Any, sandbox: SandboxAdmin, caplog: pytest.LogCaptureFixture, events: Events
) -> None:
    from tests.conftest import apply_settings
    from worker.runtime.app import app

    secret = "sk-test-SECRET-4f9a1c7e2b"
    sandbox_server.sandbox.config.api_key = secret
    apply_settings(WHEREBY_API_KEY=secret)
    try:
        caplog.set_level("DEBUG")
        book(
            "secret-1", start_in=0.5, seconds=2, notify={"task": "bookings.room_event", "queue": events.queue}
        )
        wait_for(lambda: state_of("secret-1") == "ended", timeout=10)
        sandbox_server.sandbox.config.api_key = "wrong-on-purpose"
        book("secret-2", start_in=0.2, seconds=30)  # a 401 is logged loudly, still without the key
        wait_for(lambda: any(c["status"] == 401 for c in sandbox.calls()))
        # The task logs the 401 once the reply is back, a moment after the sandbox recorded it.
        wait_for(lambda: "Whereby rejected the API key" in caplog.text)
        assert secret not in caplog.text
        redis = app.connection_for_read().default_channel.client
        for key in redis.keys("*"):
            kind = redis.type(key)
            values = (
                [redis.get(key)] if kind == b"string" else redis.lrange(key, 0, -1) if kind == b"list" else []
            )
            for value in values:
                assert secret.encode() not in (value or b""), key
        assert secret not in str(events.drain())
        assert secret not in str(sandbox.calls())
    finally:
        sandbox_server.sandbox.config.api_key = "sandbox-key"
        apply_settings(WHEREBY_API_KEY=None)


def test_cancel_while_a_replacement_is_pending_deletes_the_old_room(sandbox: SandboxAdmin) -> None:
    first = book("swap-cancel", start_in=0.5, seconds=30)
    wait_for(lambda: state_of("swap-cancel") == "ready")
    old = call("rooms.get_meeting", booking_id="swap-cancel")["room"]
    sandbox.set_faults(error_rate=1.0)  # the replacement cannot be made
    call(
        "rooms.schedule_meeting",
        booking_id="swap-cancel",
        start=first["start"],
        end=iso(parse(first["end"]) + timedelta(seconds=60)),
    )
    cancelled_at = soon(0)
    assert call("rooms.cancel_meeting", booking_id="swap-cancel")["state"] == "cancelled"
    sandbox.set_faults(error_rate=0)
    gone = wait_for(
        lambda: [r for r in sandbox.rooms() if r["meeting_id"] == old["meeting_id"] and r["deleted_at"]]
    )
    assert parse(gone[0]["deleted_at"]) - cancelled_at < timedelta(seconds=3)
    assert [r for r in sandbox.rooms() if r["live"]] == []
