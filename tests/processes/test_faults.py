"""Faults against real worker and beat processes: every meeting ends with exactly one room, none left over.

Each test asserts against the sandbox's own record of rooms: live rooms per meeting never above
one at any instant, and none alive after the meeting's end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from worker.devtools.harness import ProcessSystem, later, parse
from worker.devtools.sandbox import SandboxAdmin, SandboxServer

# A killed run's claim lapses after the lease (2 s), the next beat tick (1 s) resends it.
RECOVERY = timedelta(seconds=2 + 1 + 2)


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url)
    try:
        yield system
    finally:
        system.stop()


def book_many(
    procs: ProcessSystem, prefix: str, count: int, first_start: float, length: float, spacing: float = 0.3
) -> dict[str, tuple]:
    booked = {}
    for i in range(count):
        start = later(first_start + i * spacing)
        end = start + timedelta(seconds=length)
        view = procs.book(f"{prefix}-{i}", start, end)
        booked[view["booking_id"]] = (parse(view["start"]), parse(view["end"]))
    return booked


def assert_exactly_one_room_each(procs: ProcessSystem, booked: dict[str, tuple], late: timedelta) -> None:
    audit = procs.audit()
    assert audit.strangers == [], "rooms on Whereby that no meeting owns"
    for booking_id, (start, end) in booked.items():
        rooms = audit.rooms[booking_id]
        assert len(rooms) == 1, (booking_id, rooms)
        assert audit.max_live_at_once(booking_id) == 1
        (room,) = rooms
        assert parse(room["created_at"]) <= start + late, (booking_id, "room ready late")
        assert room["deleted_at"] is not None, (booking_id, "room left alive")
        assert audit.alive_after(booking_id, end + late) == [], (booking_id, "room alive past the end")


def wait_all_ended(procs: ProcessSystem, booked: dict[str, tuple], timeout: float = 60) -> None:
    try:
        procs.wait_for(lambda: all(procs.states().get(b) == "ended" for b in booked), timeout=timeout)
    except AssertionError:
        with procs.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT booking_id, state, attempts, due_at, claim_token, last_error FROM meeting")
            ).all()
        raise AssertionError(f"not all ended; logs in {procs.logs}: {rows}") from None


def test_lost_replies_on_create_make_one_room(procs: ProcessSystem, sandbox: SandboxAdmin) -> None:
    sandbox.script(*[{"method": "POST", "action": "lost_reply"}] * 4)
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "lost", 6, first_start=2, length=3)
    wait_all_ended(procs, booked)
    lost = [c for c in sandbox.calls() if (c["fault"] or "").startswith("lost_reply")]
    assert len(lost) == 4
    assert_exactly_one_room_each(procs, booked, late=timedelta(seconds=1))


def test_a_streak_of_failures_right_before_the_start_still_makes_the_room_in_time(
    database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    """Issue 16: the room is due 5 s before the start, and Whereby answers 503, then makes the room
    but loses the reply, then fails the look-up with a 502. With the service's own backoff (2 s,
    doubling) that streak pushed the next attempt past the start; retries that know the start
    come every second or so near it, and the room is ready in time. Attempts are not counted out
    (ROOMKEEPER_MAX_ATTEMPTS is 2 here)."""
    settings = {
        "ROOMKEEPER_CREATE_LEAD_SECONDS": "5",
        "ROOMKEEPER_RETRY_BASE_SECONDS": "2",
        "ROOMKEEPER_RETRY_MAX_SECONDS": "300",
        "ROOMKEEPER_MAX_ATTEMPTS": "2",
    }
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url, settings=settings)
    try:
        sandbox.set_faults(latency_ms=50)
        system.start_worker()
        system.start_beat()
        sandbox.script(
            {"method": "POST", "action": "error", "status": 503},
            {"method": "POST", "action": "lost_reply"},
            {"method": "GET", "action": "error", "status": 502},
        )
        booked = book_many(system, "streak", 1, first_start=8, length=4)
        wait_all_ended(system, booked)
        assert sandbox.set_faults()["script"] == []  # the whole streak was met
        assert_exactly_one_room_each(system, booked, late=timedelta(seconds=1))
        ((start, _),) = booked.values()
        (room,) = system.audit().rooms["streak-0"]
        assert parse(room["created_at"]) < start, "the room was not ready by the start"
    finally:
        system.stop()


def test_worker_killed_mid_create(procs: ProcessSystem, sandbox: SandboxAdmin) -> None:
    sandbox.set_faults(latency_ms=1200)
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "killc", 3, first_start=1.5, length=8, spacing=0)
    procs.wait_for(lambda: procs.pending_rooms() >= 1, timeout=10, interval=0.05)  # a POST is in flight
    procs.kill_workers()
    procs.start_worker()
    wait_all_ended(procs, booked)
    assert_exactly_one_room_each(procs, booked, late=RECOVERY + timedelta(seconds=3))


def test_worker_killed_mid_delete(procs: ProcessSystem, sandbox: SandboxAdmin) -> None:
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "killd", 3, first_start=1.5, length=3, spacing=0)
    procs.wait_for(lambda: all(procs.states().get(b) == "ready" for b in booked), timeout=10)
    sandbox.set_faults(latency_ms=1000)
    procs.wait_for(lambda: "deleting" in procs.states().values(), timeout=10, interval=0.05)
    procs.kill_workers()
    procs.start_worker()
    wait_all_ended(procs, booked)
    assert_exactly_one_room_each(procs, booked, late=RECOVERY + timedelta(seconds=2))


def test_worker_killed_while_holding_messages_for_later(procs: ProcessSystem) -> None:
    """The dead worker had reserved the ETA messages: the recovery pass sends them again."""
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "held", 3, first_start=4, length=3, spacing=0)
    time.sleep(2)  # beat has sent the creations, each held by the worker until its instant
    procs.kill_workers()
    procs.start_worker()
    wait_all_ended(procs, booked)
    # Creation was due 1 s before the start; the recovery pass (every 0.5 s, 2 s grace) resends it.
    assert_exactly_one_room_each(procs, booked, late=timedelta(seconds=3))


def test_redis_restarted_under_load(procs: ProcessSystem) -> None:
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "redis", 8, first_start=2, length=4, spacing=0.5)
    procs.wait_for(lambda: "ready" in procs.states().values(), timeout=10, interval=0.05)
    procs.restart_redis(down_for=1.0)  # every queued and reserved message is gone
    wait_all_ended(procs, booked, timeout=90)
    assert_exactly_one_room_each(procs, booked, late=timedelta(seconds=12))


def test_two_beats_and_two_workers_act_once(procs: ProcessSystem, sandbox: SandboxAdmin) -> None:
    procs.start_worker()
    procs.start_worker()
    procs.start_beat()
    procs.start_beat()
    booked = book_many(procs, "twice", 8, first_start=2, length=3, spacing=0.2)
    wait_all_ended(procs, booked)
    assert_exactly_one_room_each(procs, booked, late=timedelta(seconds=1))
    assert len([c for c in sandbox.calls() if c["method"] == "POST"]) == len(booked)


def test_a_429_storm_pauses_every_worker_and_loses_nothing(
    procs: ProcessSystem, sandbox: SandboxAdmin
) -> None:
    storm = 5
    sandbox.script(*[{"method": "*", "action": "rate_limit", "retry_after": 1}] * storm)
    procs.start_worker()
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "storm", 6, first_start=1.5, length=12, spacing=0)
    wait_all_ended(procs, booked, timeout=60)
    calls = sandbox.calls()
    limited = [c for c in calls if c["status"] == 429]
    assert len(limited) == storm
    # After each 429 every worker waited its Retry-After before calling Whereby again (calls
    # already on the wire when the 429 was answered may land just after it).
    for hit in limited:
        t = parse(hit["at"])
        hushed = [
            c for c in calls if t + timedelta(seconds=0.2) < parse(c["at"]) < t + timedelta(seconds=0.95)
        ]
        assert hushed == [], (hit, hushed)
    assert_exactly_one_room_each(procs, booked, late=timedelta(seconds=8))


def test_budget_shared_with_another_app(procs: ProcessSystem, sandbox: SandboxAdmin) -> None:
    """Another app spends the organisation's budget: one 429, then every worker holds back."""
    sandbox.set_faults(points_per_minute=60)
    sandbox.spend(58)
    procs.start_worker()
    procs.start_worker()
    procs.start_beat()
    booked = book_many(procs, "shared", 4, first_start=1.5, length=600, spacing=0)
    procs.wait_for(lambda: any(c["status"] == 429 for c in sandbox.calls()), timeout=10)
    time.sleep(4)
    calls = sandbox.calls()
    # Only calls already on the wire when the first 429 came back hit it; then every worker waits.
    assert {c["status"] for c in calls} == {429}, calls
    assert parse(calls[-1]["at"]) - parse(calls[0]["at"]) < timedelta(seconds=0.3), calls
    states = procs.states()
    assert all(states[b] in ("scheduled", "creating") for b in booked), states
    with procs.engine.connect() as connection:
        errors = [e for (e,) in connection.execute(text("SELECT last_error FROM meeting")).all() if e]
    assert errors and all("429" in e or "paused" in e or "Rate" in e for e in errors), errors
