"""The reconciler against the sandbox's record: lost rooms replaced or ended, orphans deleted, adoptions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import select

from tests.conftest import (
    TEST_SETTINGS,
    Events,
    apply_settings,
    call,
    clear_budget,
    iso,
    parse,
    soon,
    wait_for,
)
from worker import booking, deployment, reconcile, runtime
from worker.budget import get_budget
from worker.models import Meeting, Room, RoomState, utcnow
from worker.sandbox import SandboxAdmin, SandboxServer
from worker.store import session_scope

pytestmark = pytest.mark.usefixtures("system")

NOTHING = {"listed": 0, "foreign": 0, "orphans_deleted": 0, "lost_rooms": 0, "adopted": 0, "retired": 0}


def book(booking_id: str, seconds: float, events: Events | None = None) -> dict[str, Any]:
    start = soon(0.5)
    extra: dict[str, Any] = {}
    if events is not None:
        extra["notify"] = {"task": "bookings.room_event", "queue": events.queue}
    return call(
        "rooms.schedule_meeting",
        booking_id=booking_id,
        start=iso(start),
        end=iso(start + timedelta(seconds=seconds)),
        **extra,
    )


def get(booking_id: str) -> dict[str, Any]:
    return call("rooms.get_meeting", booking_id=booking_id)


def ready_view(booking_id: str, not_room: str | None = None) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        view = get(booking_id)
        if view["state"] == "ready" and view["room"]["meeting_id"] != not_room:
            return view
        return None

    return wait_for(ready)


def stored_meeting(booking_id: str) -> Meeting:
    with session_scope() as session:
        return session.exec(select(Meeting).where(Meeting.booking_id == booking_id)).one()


def stored_rooms(booking_id: str) -> list[Room]:
    meeting = stored_meeting(booking_id)
    with session_scope() as session:
        return list(session.exec(select(Room).where(Room.meeting_pk == meeting.id).order_by(Room.id)))


def sandbox_rooms_of(sandbox: SandboxAdmin, booking_id: str, live_only: bool = False) -> list[dict[str, Any]]:
    """The sandbox's own record of the rooms made for this booking (matched by the attempts' tags)."""
    tags = {room.tag for room in stored_rooms(booking_id)}
    return [
        room
        for room in sandbox.rooms(include_deleted=not live_only)
        if (name := deployment.parse(room["room_name"], "rk")) is not None and name.tag in tags
    ]


def at_most_one_live(sandbox: SandboxAdmin, booking_id: str) -> None:
    live = sandbox_rooms_of(sandbox, booking_id, live_only=True)
    assert len(live) <= 1, live


def actions(booking_id: str) -> list[tuple[str, str, str]]:
    return [(h.kind, h.action, h.outcome) for h in booking.history(booking_id)]


def posts(sandbox: SandboxAdmin) -> list[dict[str, Any]]:
    return [c for c in sandbox.calls() if c["method"] == "POST"]


def make_room_behind_our_back(sandbox_server: SandboxServer, prefix: str) -> dict[str, Any]:
    """A room made on Whereby by someone else (or by a crashed, forgotten run of ours)."""
    response = httpx.post(
        f"{sandbox_server.url}/meetings",
        headers={"Authorization": "Bearer sandbox-key"},
        json={"endDate": iso(soon(3600)), "roomNamePrefix": prefix},
        timeout=10,
    )
    response.raise_for_status()
    room: dict[str, Any] = response.json()
    return room


def end_soon(booking_id: str, seconds: float, events: Events) -> None:
    """Reschedule to an earlier end: the room is kept and deleted at that end."""
    view = get(booking_id)
    call(
        "rooms.schedule_meeting",
        booking_id=booking_id,
        start=view["start"],
        end=iso(soon(seconds)),
        notify={"task": "bookings.room_event", "queue": events.queue},
    )


def live_on_sandbox(sandbox: SandboxAdmin, meeting_id: str) -> bool:
    return any(r["meeting_id"] == meeting_id and r["live"] for r in sandbox.rooms())


# --------------------------------------------------------------------------------------------


def test_room_deleted_out_of_band_before_the_end_is_replaced(sandbox: SandboxAdmin, events: Events) -> None:
    book("vanish-1", seconds=60, events=events)
    old = ready_view("vanish-1")["room"]
    sandbox.delete_out_of_band(old["meeting_id"])

    counts = reconcile.reconcile()
    assert counts == {**NOTHING, "lost_rooms": 1}

    def replaced() -> dict[str, Any] | None:
        at_most_one_live(sandbox, "vanish-1")
        view = get("vanish-1")
        if view["state"] == "ready" and view["room"]["meeting_id"] != old["meeting_id"]:
            return view
        return None

    new = wait_for(replaced)["room"]
    assert new["room_url"] != old["room_url"]
    assert new["end_date"] == old["end_date"]
    (live,) = sandbox_rooms_of(sandbox, "vanish-1", live_only=True)
    assert live["meeting_id"] == new["meeting_id"]
    (gone,) = [r for r in sandbox_rooms_of(sandbox, "vanish-1") if r["meeting_id"] == old["meeting_id"]]
    assert gone["deleted_by"] == "out_of_band"

    assert wait_for(lambda: events.names() == ["room.ready", "room.replaced"])
    assert events.seen[1]["meeting"]["state"] == "ready"
    assert events.seen[1]["meeting"]["room"]["meeting_id"] == new["meeting_id"]

    history = actions("vanish-1")
    assert ("note", f"room {old['meeting_id']} is gone from Whereby", "found by the reconciler") in history
    assert ("state", "ready -> creating", "room vanished before the end: replacing it") in history
    assert ("state", "creating -> ready", f"room {new['meeting_id']}") in history
    assert ("event", "room.replaced", "") in history

    # The repaired meeting is in step now: a second pass finds nothing to do.
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}

    # And its new room is looked after like any other: deleted at the meeting's end.
    end_soon("vanish-1", 1.5, events)
    wait_for(lambda: get("vanish-1")["state"] == "ended", timeout=10)
    assert sandbox_rooms_of(sandbox, "vanish-1", live_only=True) == []
    assert len(posts(sandbox)) == 2
    assert wait_for(lambda: events.names()[-1] == "room.deleted")


def test_room_deleted_out_of_band_after_the_end_ends_the_meeting(
    sandbox: SandboxAdmin, events: Events
) -> None:
    book("vanish-2", seconds=60, events=events)
    room = ready_view("vanish-2")["room"]
    sandbox.delete_out_of_band(room["meeting_id"])
    # The meeting's end passes before anyone notices (its deletion, due at the old end, never ran).
    now = utcnow()
    with session_scope() as session:
        meeting = session.exec(select(Meeting).where(Meeting.booking_id == "vanish-2")).one()
        meeting.start = now - timedelta(seconds=30)
        meeting.end = meeting.room_end = now - timedelta(seconds=1)

    assert reconcile.reconcile() == {**NOTHING, "lost_rooms": 1}

    view = get("vanish-2")
    assert view["state"] == "ended"
    assert view["room"] is None
    assert wait_for(lambda: events.names() == ["room.ready", "room.deleted"])
    assert events.seen[1]["meeting"]["state"] == "ended"
    assert ("state", "ready -> ended", "room vanished after the end") in actions("vanish-2")

    time.sleep(1.5)  # a dispatcher tick or two: nothing may make a new room for an ended meeting
    assert len(posts(sandbox)) == 1
    assert [r["meeting_id"] for r in sandbox.rooms()] == [room["meeting_id"]]
    assert sandbox.rooms(include_deleted=False) == []
    assert get("vanish-2")["state"] == "ended"


def other_identity() -> str:
    return "zz9zz" if deployment.identity() != "zz9zz" else "yy8yy"


def test_orphan_of_this_deployment_is_deleted_at_the_first_pass_and_no_one_elses_is(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    book("keeper-1", seconds=60)
    ours = ready_view("keeper-1")["room"]
    # Carries this deployment's identity, but no attempt of ours recorded its tag: nothing is in
    # flight that could still claim it, so it goes now, not after a grace.
    orphan = make_room_behind_our_back(sandbox_server, f"rk-{deployment.identity()}-zzzzzzzz-")
    other_deployment = make_room_behind_our_back(sandbox_server, f"rk-{other_identity()}-zzzzzzzz-")
    legacy_unknown = make_room_behind_our_back(sandbox_server, "rk-zzzzzzzz-")  # named before identities
    other_app = make_room_behind_our_back(sandbox_server, "otherapp-")

    counts = reconcile.reconcile()

    assert counts == {**NOTHING, "listed": 4, "foreign": 2, "orphans_deleted": 1}
    by_id = {r["meeting_id"]: r for r in sandbox.rooms()}
    assert by_id[orphan["meetingId"]]["deleted_by"] == "api"
    for room in (other_deployment, legacy_unknown, other_app):
        assert by_id[room["meetingId"]]["live"] is True
    assert by_id[ours["meeting_id"]]["live"] is True
    assert get("keeper-1")["room"] == ours
    deletes = [c for c in sandbox.calls() if c["method"] == "DELETE"]
    assert [c["meeting_id"] for c in deletes] == [orphan["meetingId"]]

    # Nothing is left to repair, and the others' rooms still stand.
    assert reconcile.reconcile() == {**NOTHING, "listed": 3, "foreign": 2}
    for room in (other_deployment, legacy_unknown, other_app):
        assert live_on_sandbox(sandbox, room["meetingId"])


def test_two_deployments_on_one_organisation_never_touch_each_others_rooms(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    book("mine-1", seconds=60)
    mine = ready_view("mine-1")["room"]
    (attempt,) = stored_rooms("mine-1")
    theirs = [
        make_room_behind_our_back(sandbox_server, f"rk-{other_identity()}-aaaaaaaa-"),
        # Even a tag that one of our attempts uses: the identity decides whose room it is.
        make_room_behind_our_back(sandbox_server, f"rk-{other_identity()}-{attempt.tag}-"),
    ]
    sandbox.delete_out_of_band(mine["meeting_id"])

    # Our own room, deleted out of band, is replaced at the very next pass: no grace to wait out.
    assert reconcile.reconcile() == {**NOTHING, "listed": 2, "foreign": 2, "lost_rooms": 1}
    new = ready_view("mine-1", not_room=mine["meeting_id"])["room"]

    for _ in range(3):  # several passes, longer than any grace used to be: theirs stand
        assert reconcile.reconcile() == {**NOTHING, "listed": 3, "foreign": 2}
    for room in theirs:
        assert live_on_sandbox(sandbox, room["meetingId"])
    assert live_on_sandbox(sandbox, new["meeting_id"])
    deleted = {c["meeting_id"] for c in sandbox.calls() if c["method"] == "DELETE"}
    assert deleted.isdisjoint(room["meetingId"] for room in theirs)


def test_a_room_the_listing_lacks_but_whereby_still_has_is_not_replaced(
    sandbox: SandboxAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that lags behind a creation must not cost a meeting its URLs: one read decides."""
    book("lagging-1", seconds=60)
    room = ready_view("lagging-1")["room"]
    client = runtime.client()
    listed = client.list_meetings

    def lagging_list(**kwargs: Any) -> Iterator[Any]:
        return (m for m in listed(**kwargs) if m.meeting_id != room["meeting_id"])

    monkeypatch.setattr(client, "list_meetings", lagging_list)

    assert reconcile.reconcile() == NOTHING
    assert get("lagging-1")["room"] == room
    assert live_on_sandbox(sandbox, room["meeting_id"])
    reads = [c for c in sandbox.calls() if c["method"] == "GET" and c.get("meeting_id") == room["meeting_id"]]
    assert len(reads) == 1


@pytest.fixture
def slow_retries(configured: str) -> Iterator[None]:
    """A failed create is retried 15-30 s later: long enough for the reconciler to get there first."""
    apply_settings(ROOMKEEPER_RETRY_BASE_SECONDS="30", ROOMKEEPER_RETRY_MAX_SECONDS="60")
    yield
    apply_settings(
        **{
            name: TEST_SETTINGS[name]
            for name in ("ROOMKEEPER_RETRY_BASE_SECONDS", "ROOMKEEPER_RETRY_MAX_SECONDS")
        }
    )


def lose_the_reply(sandbox: SandboxAdmin, booking_id: str, events: Events | None = None) -> dict[str, Any]:
    """Book a meeting whose first create makes a room on Whereby but loses the reply; returns that room."""
    sandbox.script({"method": "POST", "action": "lost_reply"})
    book(booking_id, seconds=90, events=events)
    wait_for(lambda: any(action == "retry planned" for _, action, _ in actions(booking_id)))
    view = get(booking_id)
    assert view["state"] == "creating"
    assert view["room"] is None
    (made,) = sandbox.rooms()
    assert made["live"]
    (pending,) = stored_rooms(booking_id)
    assert pending.state == RoomState.PENDING
    assert made["room_name"].startswith(f"/rk-{deployment.identity()}-{pending.tag}-")
    return made


@pytest.mark.usefixtures("slow_retries")
def test_room_made_by_a_lost_reply_is_adopted_not_duplicated(sandbox: SandboxAdmin, events: Events) -> None:
    made = lose_the_reply(sandbox, "lost-2", events)
    meeting = stored_meeting("lost-2")
    assert meeting.claim_until is None  # the failed attempt released its claim
    assert meeting.due_at is not None and meeting.due_at > utcnow() + timedelta(seconds=10)

    assert reconcile.reconcile() == {**NOTHING, "listed": 1, "adopted": 1}

    view = get("lost-2")
    assert view["state"] == "ready"
    assert view["room"]["meeting_id"] == made["meeting_id"]
    assert view["room"]["room_url"] == made["room_url"]
    assert view["last_error"] is None
    assert wait_for(lambda: events.names() == ["room.ready"])
    assert events.seen[0]["meeting"]["room"]["meeting_id"] == made["meeting_id"]
    assert (
        "state",
        "creating -> ready",
        f"reconciler adopted room {made['meeting_id']}",
    ) in actions("lost-2")
    assert len(posts(sandbox)) == 1
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}

    # The adopted room is the meeting's room from now on: deleted at its end, and never a second one.
    end_soon("lost-2", 1.5, events)
    wait_for(lambda: get("lost-2")["state"] == "ended", timeout=10)
    (room,) = sandbox.rooms()
    assert room["meeting_id"] == made["meeting_id"]
    assert room["deleted_by"] == "api"
    assert len(posts(sandbox)) == 1
    assert events.names() == ["room.ready", "room.deleted"]


def _claim_the_pending_attempt(booking_id: str) -> None:
    """As if a worker had just taken the meeting to retry it, and was about to look the room up."""
    with session_scope() as session:
        meeting = session.exec(select(Meeting).where(Meeting.booking_id == booking_id)).one()
        meeting.claim_token = "a-running-attempt"
        meeting.claim_until = utcnow() + timedelta(seconds=60)


@pytest.mark.usefixtures("slow_retries")
def test_room_of_an_attempt_still_running_is_left_to_that_attempt(sandbox: SandboxAdmin) -> None:
    made = lose_the_reply(sandbox, "lost-3")
    _claim_the_pending_attempt("lost-3")

    counts = reconcile.reconcile()

    assert counts["orphans_deleted"] == 0
    assert counts["lost_rooms"] == 0
    assert live_on_sandbox(sandbox, made["meeting_id"])
    assert get("lost-3")["state"] == "creating"
    (pending,) = stored_rooms("lost-3")
    assert pending.state == RoomState.PENDING
    assert not [c for c in sandbox.calls() if c["method"] == "DELETE"]


@pytest.mark.usefixtures("slow_retries")
def test_room_left_to_a_running_attempt_is_not_counted_as_adopted(sandbox: SandboxAdmin) -> None:
    lose_the_reply(sandbox, "lost-4")
    _claim_the_pending_attempt("lost-4")

    counts = reconcile.reconcile()

    assert get("lost-4")["state"] == "creating"
    assert counts == {**NOTHING, "listed": 1}


def test_reconcile_calls_whereby_only_within_the_shared_budget(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    orphan = make_room_behind_our_back(sandbox_server, f"rk-{deployment.identity()}-zzzzzzzz-")
    apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="10")
    try:
        clear_budget()
        get_budget().acquire("GET", 8)  # what other workers spent: all that reads may use
        seen = len(sandbox.calls())

        assert reconcile.reconcile() == NOTHING  # no error: it tries again next time

        assert sandbox.calls()[seen:] == []
        assert live_on_sandbox(sandbox, orphan["meetingId"])

        # Once the budget has room again, the same pass does its work, and pays for it.
        clear_budget()
        assert reconcile.reconcile() == {**NOTHING, "listed": 1, "orphans_deleted": 1}
        assert not live_on_sandbox(sandbox, orphan["meetingId"])
        assert get_budget().spent() == 1 + 2  # one list page, one deletion
    finally:
        clear_budget()
        apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE=TEST_SETTINGS["ROOMKEEPER_API_POINTS_PER_MINUTE"])


@pytest.mark.usefixtures("slow_retries")
def test_adoption_shows_in_the_views_updated_at(sandbox: SandboxAdmin) -> None:
    lose_the_reply(sandbox, "lost-5")
    before = get("lost-5")["updated_at"]
    reconciled_at = utcnow()

    assert reconcile.reconcile()["adopted"] == 1

    view = get("lost-5")
    assert view["state"] == "ready"
    assert view["updated_at"] != before
    assert parse(view["updated_at"]) >= reconciled_at - timedelta(milliseconds=1)


def test_cancelled_meetings_room_found_gone_is_reported_deleted(
    sandbox: SandboxAdmin, events: Events
) -> None:
    book("gone-after-cancel", seconds=60, events=events)
    room = ready_view("gone-after-cancel")["room"]
    # Whereby keeps failing the deletion, and meanwhile the room disappears on its side.
    sandbox.script(*[{"method": "DELETE", "action": "error", "status": 503}] * 60)
    assert call("rooms.cancel_meeting", booking_id="gone-after-cancel")["state"] == "cancelled"
    wait_for(lambda: any(c["method"] == "DELETE" for c in sandbox.calls()))
    sandbox.delete_out_of_band(room["meeting_id"])

    assert reconcile.reconcile() == {**NOTHING, "lost_rooms": 1}

    assert get("gone-after-cancel")["state"] == "cancelled"
    assert wait_for(lambda: events.names() == ["room.ready", "room.deleted"], timeout=3)
