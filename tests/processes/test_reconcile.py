"""The reconciler against the sandbox's record: lost rooms replaced or ended, orphans deleted, adoptions,
and every room it does not own (another deployment's, an unknown legacy one) left alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import col, select

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
from worker import store
from worker.adapters import whereby_calls
from worker.adapters.budget import get_budget
from worker.devtools.harness import ProcessSystem, later
from worker.devtools.sandbox import SandboxAdmin, SandboxServer
from worker.jobs import booking, reconcile
from worker.store import deployment, session_scope
from worker.store.models import Meeting, Room, RoomState, utcnow

pytestmark = pytest.mark.usefixtures("system")

NOTHING = {"listed": 0, "foreign": 0, "orphans_deleted": 0, "lost_rooms": 0, "adopted": 0, "retired": 0}


def book(
    booking_id: str, seconds: float, events: Events | None = None, start_in: float = 0.5
) -> dict[str, Any]:
    start = soon(start_in)
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
        return list(session.exec(select(Room).where(Room.meeting_pk == meeting.id).order_by(col(Room.id))))


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
        start=iso(min(parse(view["start"]), soon(0))),
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


def list_calls(sandbox: SandboxAdmin) -> int:
    """GET /meetings calls so far, from every deployment (each reconcile pass makes one here)."""
    return sum(1 for c in sandbox.calls() if c["method"] == "GET" and c.get("meeting_id") is None)


@pytest.fixture
def second_deployment(
    tmp_path: Path, sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> Iterator[ProcessSystem]:
    """Another roomkeeper on the same Whereby organisation: its own database (and so its own
    identity), its own Redis, its own worker and beat (reconciling every second), the same sandbox."""
    url = f"sqlite:///{tmp_path / 'second-deployment.db'}"
    store.migrate(url)
    settings = {"ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "1"}
    system = ProcessSystem(url, sandbox_server.url, sandbox_server.admin_url, settings)
    try:
        system.start_worker()
        system.start_beat()
        yield system
    finally:
        system.stop()
        store.get_engine(url).dispose()  # the engine its migration opened in this process


def identity_of(system: ProcessSystem) -> str:
    with system.engine.connect() as connection:
        found: str = connection.execute(text("SELECT identity FROM deployment WHERE id = 1")).scalar_one()
    return found


def test_a_second_deployment_on_the_organisation_keeps_its_rooms_and_ours_are_repaired(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer, events: Events, second_deployment: ProcessSystem
) -> None:
    theirs = second_deployment
    their_identity = identity_of(theirs)
    assert their_identity != deployment.identity()
    start = later(0.5)
    their_view = theirs.book("theirs-1", start, start + timedelta(seconds=90))
    book("ours-kept", seconds=90, events=events)
    book("ours-vanish", seconds=90, events=events)
    kept = ready_view("ours-kept")["room"]
    vanished = ready_view("ours-vanish")["room"]
    theirs.wait_for(lambda: theirs.states().get("theirs-1") == "ready", timeout=20)
    (their_room,) = theirs.audit().rooms["theirs-1"]
    assert their_room["room_name"].startswith(f"/rk-{their_identity}-")
    orphan = make_room_behind_our_back(sandbox_server, f"rk-{deployment.identity()}-zzzzzzzz-")
    sandbox.delete_out_of_band(vanished["meeting_id"])

    # One pass: our orphan deleted, our lost room confirmed gone and replaced; theirs only counted.
    assert reconcile.reconcile() == {
        **NOTHING,
        "listed": 3,
        "foreign": 1,
        "orphans_deleted": 1,
        "lost_rooms": 1,
    }
    replacement = ready_view("ours-vanish", not_room=vanished["meeting_id"])["room"]

    # Several passes of both reconcilers (theirs every second): each sees the other's rooms, live
    # all along, and leaves them be.
    their_passes_from = list_calls(sandbox)
    ours = 0
    while list_calls(sandbox) - their_passes_from - ours < 3:
        assert reconcile.reconcile() == {**NOTHING, "listed": 3, "foreign": 1}
        ours += 1
        assert ours < 20, "the second deployment's reconciler never ran"
        time.sleep(0.5)
    live = {r["meeting_id"] for r in sandbox.rooms(include_deleted=False)}
    assert live == {kept["meeting_id"], replacement["meeting_id"], their_room["meeting_id"]}
    assert get("ours-kept")["room"] == kept
    assert theirs.states() == {"theirs-1": "ready"}

    # Both end their meetings soon; each deployment deletes its own rooms at their end.
    end_soon("ours-kept", 2, events)
    end_soon("ours-vanish", 2, events)
    their_view = theirs.book("theirs-1", parse(their_view["start"]), later(2))
    wait_for(lambda: all(get(b)["state"] == "ended" for b in ("ours-kept", "ours-vanish")), timeout=15)
    theirs.wait_for(lambda: theirs.states().get("theirs-1") == "ended", timeout=15)

    # The sandbox's own record: no room of either deployment deleted before its meeting's end,
    # bar the one deleted out of band and our orphan; every room accounted for.
    ends = {b: parse(get(b)["end"]) for b in ("ours-kept", "ours-vanish")}
    ends["theirs-1"] = parse(their_view["end"])
    rooms = {b: sandbox_rooms_of(sandbox, b) for b in ("ours-kept", "ours-vanish")}
    audit = theirs.audit()
    rooms["theirs-1"] = audit.rooms["theirs-1"]
    assert [r["meeting_id"] for r in rooms["ours-kept"]] == [kept["meeting_id"]]
    assert [r["meeting_id"] for r in rooms["ours-vanish"]] == [
        vanished["meeting_id"],
        replacement["meeting_id"],
    ]
    assert [r["meeting_id"] for r in rooms["theirs-1"]] == [their_room["meeting_id"]]
    for booking_id, made in rooms.items():
        for room in made:
            assert not room["live"], (booking_id, room)
            if room["meeting_id"] == vanished["meeting_id"]:
                assert room["deleted_by"] == "out_of_band"
                continue
            assert room["deleted_by"] == "api", (booking_id, room)
            assert parse(room["deleted_at"]) >= ends[booking_id], (booking_id, room)
    everything = {r["meeting_id"]: r for r in sandbox.rooms()}
    assert everything[orphan["meetingId"]]["deleted_by"] == "api"
    assert set(everything) == {orphan["meetingId"]} | {
        r["meeting_id"] for made in rooms.values() for r in made
    }
    assert reconcile.reconcile() == NOTHING


def test_a_room_the_listing_lacks_but_whereby_still_has_is_not_replaced(
    sandbox: SandboxAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that lags behind a creation must not cost a meeting its URLs: one read decides."""
    book("lagging-1", seconds=60)
    room = ready_view("lagging-1")["room"]
    client = whereby_calls.client()
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
    """A failed create is retried 15-30 s later: long enough for the reconciler to get there first.
    Retries close in on a meeting's start, so the meetings of these tests start LOST_REPLY_START_IN
    from now, with a lead long enough that their rooms are due at once."""
    apply_settings(
        ROOMKEEPER_RETRY_BASE_SECONDS="30",
        ROOMKEEPER_RETRY_MAX_SECONDS="60",
        ROOMKEEPER_CREATE_LEAD_SECONDS=str(LOST_REPLY_START_IN + 30),
    )
    yield
    apply_settings(
        **{
            name: TEST_SETTINGS[name]
            for name in (
                "ROOMKEEPER_RETRY_BASE_SECONDS",
                "ROOMKEEPER_RETRY_MAX_SECONDS",
                "ROOMKEEPER_CREATE_LEAD_SECONDS",
            )
        }
    )


LOST_REPLY_START_IN = 120.0


def lose_the_reply(sandbox: SandboxAdmin, booking_id: str, events: Events | None = None) -> dict[str, Any]:
    """Book a meeting whose first create makes a room on Whereby but loses the reply; returns that room."""
    sandbox.script({"method": "POST", "action": "lost_reply"})
    book(booking_id, seconds=90, events=events, start_in=LOST_REPLY_START_IN)
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
    assert wait_for(lambda: events.names() == ["room.ready", "room.deleted"], timeout=3)


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
    (stored,) = stored_rooms("gone-after-cancel")
    assert stored.state == RoomState.DELETED

    # Its deletion stops retrying once the room is recorded gone: nothing keeps calling Whereby
    # (nor, in this suite, reaches into the next test's rooms).
    def quiet() -> bool:
        deletes = [c for c in sandbox.calls() if c["method"] == "DELETE"]
        return parse(deletes[-1]["at"]) < utcnow() - timedelta(seconds=1.5)

    wait_for(quiet, timeout=10)


# -- rooms named before deployments had identities --------------------------------------------


def make_legacy(booking_id: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> dict[str, Any]:
    """Turn the booking's live room into one made before identities existed: `/rk-<tag>-…`, known
    to the store by its id and tag (as a store migrated from that version holds it)."""
    (room,) = stored_rooms(booking_id)
    tag = deployment.new_tag()
    legacy = make_room_behind_our_back(sandbox_server, f"rk-{tag}-")
    with session_scope() as session:
        row = session.get(Room, room.id)
        assert row is not None and row.state == RoomState.LIVE
        row.tag = tag
        row.name_prefix = f"rk-{tag}-"
        row.whereby_id = legacy["meetingId"]
        row.room_name = legacy["roomName"]
        row.room_url = legacy["roomUrl"]
    sandbox.delete_out_of_band(room.whereby_id or "")  # the new-format room never existed
    assert deployment.parse(legacy["roomName"], "rk") == deployment.RoomName(None, tag)
    return legacy


def test_a_legacy_room_the_store_knows_is_ours_and_deleted_at_its_end(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer, events: Events
) -> None:
    book("legacy-1", seconds=60, events=events)
    ready_view("legacy-1")
    legacy = make_legacy("legacy-1", sandbox, sandbox_server)
    assert get("legacy-1")["room"]["meeting_id"] == legacy["meetingId"]
    unknown_legacy = make_room_behind_our_back(sandbox_server, "rk-zzzzzzzz-")  # another deployment's

    for _ in range(3):  # ours: neither an orphan nor lost; the unknown one: foreign, left alone
        assert reconcile.reconcile() == {**NOTHING, "listed": 2, "foreign": 1}
    assert live_on_sandbox(sandbox, legacy["meetingId"])
    assert live_on_sandbox(sandbox, unknown_legacy["meetingId"])
    assert get("legacy-1")["room"]["meeting_id"] == legacy["meetingId"]
    deleted = {c["meeting_id"] for c in sandbox.calls() if c["method"] == "DELETE"}
    assert deleted.isdisjoint({legacy["meetingId"], unknown_legacy["meetingId"]})

    end_soon("legacy-1", 1.5, events)
    wait_for(lambda: get("legacy-1")["state"] == "ended", timeout=10)
    by_id = {r["meeting_id"]: r for r in sandbox.rooms()}
    assert by_id[legacy["meetingId"]]["deleted_by"] == "api"
    assert parse(by_id[legacy["meetingId"]]["deleted_at"]) >= parse(get("legacy-1")["end"])
    assert by_id[unknown_legacy["meetingId"]]["live"] is True
    assert wait_for(lambda: events.names() == ["room.ready", "room.deleted"])
    assert reconcile.reconcile() == {**NOTHING, "listed": 1, "foreign": 1}
    assert live_on_sandbox(sandbox, unknown_legacy["meetingId"])


def test_a_legacy_room_the_store_knows_is_replaced_when_it_vanishes(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer, events: Events
) -> None:
    book("legacy-2", seconds=60, events=events)
    ready_view("legacy-2")
    legacy = make_legacy("legacy-2", sandbox, sandbox_server)
    sandbox.delete_out_of_band(legacy["meetingId"])

    assert reconcile.reconcile() == {**NOTHING, "lost_rooms": 1}

    new = ready_view("legacy-2", not_room=legacy["meetingId"])["room"]
    assert new["room_url"] != legacy["roomUrl"]
    (live,) = sandbox.rooms(include_deleted=False)
    assert live["meeting_id"] == new["meeting_id"]
    assert live["room_name"].startswith(f"/rk-{deployment.identity()}-")  # made the new way
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}


@pytest.mark.usefixtures("slow_retries")
def test_a_legacy_named_room_of_a_lost_reply_is_adopted_by_its_tag(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    made = lose_the_reply(sandbox, "legacy-3")
    (pending,) = stored_rooms("legacy-3")
    # The attempt was recorded (and its room made) by the version before identities.
    legacy = make_room_behind_our_back(sandbox_server, f"rk-{pending.tag}-")
    sandbox.delete_out_of_band(made["meeting_id"])
    with session_scope() as session:
        row = session.get(Room, pending.id)
        assert row is not None
        row.name_prefix = f"rk-{pending.tag}-"

    assert reconcile.reconcile() == {**NOTHING, "listed": 1, "adopted": 1}

    view = get("legacy-3")
    assert view["state"] == "ready"
    assert view["room"]["meeting_id"] == legacy["meetingId"]
    assert live_on_sandbox(sandbox, legacy["meetingId"])
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}


# -- two rooms of one attempt -------------------------------------------------------------------


def test_a_second_room_of_a_ready_meetings_attempt_is_deleted_and_the_first_kept(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    """A POST that landed after its retry's look-up found nothing (a slow Whereby, a lagging
    list) makes a second room with the attempt's tag: ours, and no meeting's room."""
    book("twice-1", seconds=60)
    room = ready_view("twice-1")["room"]
    (attempt,) = stored_rooms("twice-1")
    duplicate = make_room_behind_our_back(sandbox_server, attempt.name_prefix)

    assert reconcile.reconcile() == {**NOTHING, "listed": 2, "orphans_deleted": 1}

    by_id = {r["meeting_id"]: r for r in sandbox.rooms()}
    assert by_id[duplicate["meetingId"]]["deleted_by"] == "api"
    assert by_id[room["meeting_id"]]["live"] is True
    assert get("twice-1")["room"] == room
    assert ("note", f"reconciler deleted orphan room {duplicate['meetingId']}", "") in actions("twice-1")
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}


@pytest.mark.usefixtures("slow_retries")
def test_of_two_rooms_of_a_lost_reply_one_is_adopted_and_the_other_deleted(
    sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    made = lose_the_reply(sandbox, "twice-2")
    (pending,) = stored_rooms("twice-2")
    duplicate = make_room_behind_our_back(sandbox_server, pending.name_prefix)

    assert reconcile.reconcile() == {**NOTHING, "listed": 2, "adopted": 1, "orphans_deleted": 1}

    view = get("twice-2")
    assert view["state"] == "ready"
    assert view["room"]["meeting_id"] == made["meeting_id"]
    (live,) = sandbox_rooms_of(sandbox, "twice-2", live_only=True)
    assert live["meeting_id"] == made["meeting_id"]
    assert not live_on_sandbox(sandbox, duplicate["meetingId"])
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}


# -- the one race kept: a creation in flight --------------------------------------------------


def _lapse_the_claim(booking_id: str, ago: timedelta) -> None:
    """As if the run that held the meeting had died, its lease over `ago`."""
    with session_scope() as session:
        meeting = session.exec(select(Meeting).where(Meeting.booking_id == booking_id)).one()
        meeting.claim_token = "a-dead-run"
        meeting.claim_until = utcnow() - ago


@pytest.mark.usefixtures("slow_retries")
def test_a_pending_attempt_is_adopted_at_the_first_pass_once_its_claim_lapsed(sandbox: SandboxAdmin) -> None:
    made = lose_the_reply(sandbox, "lapsed-1")
    # Within the clock slack after its lease, the claim still counts as held: another host's
    # clock may say the run is alive.
    _lapse_the_claim("lapsed-1", reconcile.CLOCK_SLACK - timedelta(seconds=1))
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}
    assert get("lapsed-1")["state"] == "creating"

    # Past the slack, no run can still be making it: adopted now, with no grace to wait out.
    _lapse_the_claim("lapsed-1", reconcile.CLOCK_SLACK + timedelta(seconds=1))
    assert reconcile.reconcile() == {**NOTHING, "listed": 1, "adopted": 1}
    view = get("lapsed-1")
    assert view["state"] == "ready"
    assert view["room"]["meeting_id"] == made["meeting_id"]
    assert stored_meeting("lapsed-1").claim_token is None
    assert len(posts(sandbox)) == 1


@pytest.fixture
def stalling_sandbox(sandbox: SandboxAdmin) -> Iterator[SandboxAdmin]:
    """POST replies that stall for 3 s after the room is made, then come back as a 504."""
    sandbox.set_faults(stall_seconds=3)
    try:
        yield sandbox
    finally:
        sandbox.set_faults(stall_seconds=30)


def test_a_room_whose_creation_is_still_in_flight_is_left_to_its_run(
    stalling_sandbox: SandboxAdmin,
) -> None:
    sandbox = stalling_sandbox
    sandbox.script({"method": "POST", "action": "lost_reply", "mode": "stall"})
    book("inflight-1", seconds=60)
    made = wait_for(lambda: sandbox.rooms())[0]  # on Whereby, its reply not yet back
    (pending,) = stored_rooms("inflight-1")
    assert pending.state == RoomState.PENDING
    assert made["room_name"].startswith(f"/rk-{deployment.identity()}-{pending.tag}-")

    # The run holds the meeting: the room is its own to record, not an orphan nor the reconciler's.
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}
    assert live_on_sandbox(sandbox, made["meeting_id"])
    assert get("inflight-1")["state"] == "creating"

    # The reply is lost after all; the next attempt looks the tag up and keeps that very room.
    view = ready_view("inflight-1")
    assert view["room"]["meeting_id"] == made["meeting_id"]
    assert len(posts(sandbox)) == 1
    assert made["meeting_id"] not in {c["meeting_id"] for c in sandbox.calls() if c["method"] == "DELETE"}
    assert reconcile.reconcile() == {**NOTHING, "listed": 1}
