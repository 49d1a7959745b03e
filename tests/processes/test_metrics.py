"""`/metrics` (CONTRACT §4.1): what workers record into Redis and what the store holds, as scraped.

The figures are read through the web app exactly as a scrape reads them, and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BROKER, apply_settings, call, clear_budget, iso, soon, wait_for
from worker.adapters import budget, metrics, metrics_export, whereby
from worker.devtools.localredis import free_port
from worker.devtools.sandbox import SandboxAdmin
from worker.faces.web.app import create_app
from worker.store import session_scope
from worker.store.models import Meeting, MeetingState, Room, RoomState

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(samples: Samples, operation: str, status: str) -> float:
    return value(samples, "roomkeeper_whereby_calls_total", operation=operation, status=status)


def lag_count(samples: Samples) -> float:
    return value(samples, "roomkeeper_deletion_lag_seconds_count")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def store_only(database: str) -> Iterator[str]:
    """The test database, nothing running on it."""
    before = os.environ.get("ROOMKEEPER_DATABASE_URL")
    apply_settings(ROOMKEEPER_DATABASE_URL=database, ROOMKEEPER_BROKER_URL=BROKER)
    yield database
    apply_settings(ROOMKEEPER_DATABASE_URL=before)


@pytest.fixture
def empty_counters() -> None:
    client = metrics._client()
    client.delete(metrics.CALLS_KEY, metrics.LAG_KEY)


# --------------------------------------------------------------------------------------------
# The store's figures: meetings by state, live and overrunning rooms, the oldest overdue deletion.


def _meeting(session: Any, booking_id: str, state: MeetingState, now: datetime) -> Meeting:
    meeting = Meeting(
        booking_id=booking_id,
        state=state,
        start=now,
        end=now + timedelta(minutes=30),
        create_at=now,
        room_end=now + timedelta(minutes=30),
        created_at=now,
        updated_at=now,
    )
    session.add(meeting)
    session.flush()
    return meeting


def _room(session: Any, meeting: Meeting, tag: str, state: RoomState, now: datetime, **fields: Any) -> None:
    assert meeting.id is not None
    session.add(
        Room(
            meeting_pk=meeting.id,
            tag=tag,
            name_prefix="/rk",
            state=state,
            end_date=now + timedelta(minutes=30),
            created_at=now,
            **fields,
        )
    )


def test_store_figures_by_state_live_overrunning_and_overdue(store_only: str, client: TestClient) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with session_scope() as session:
        for n in range(3):
            _meeting(session, f"sched-{n}", MeetingState.SCHEDULED, now)
        _meeting(session, "ended-0", MeetingState.ENDED, now)
        ready = _meeting(session, "ready-0", MeetingState.READY, now)
        overrun = _meeting(session, "ready-1", MeetingState.READY, now)
        late = _meeting(session, "deleting-0", MeetingState.DELETING, now)
        later = _meeting(session, "deleting-1", MeetingState.DELETING, now)
        gone = _meeting(session, "cancelled-0", MeetingState.CANCELLED, now)
        _room(session, ready, "t-ready", RoomState.LIVE, now, due_at=now + timedelta(minutes=30))
        _room(
            session,
            overrun,
            "t-overrun",
            RoomState.LIVE,
            now,
            due_at=now + timedelta(minutes=5),
            overrun_since=now,
        )
        _room(session, late, "t-late", RoomState.LIVE, now, due_at=now - timedelta(seconds=42))
        _room(session, later, "t-later", RoomState.LIVE, now, due_at=now - timedelta(seconds=7))
        # Not live: deleted long after it was due, and a create still in flight. Neither counts.
        _room(session, gone, "t-gone", RoomState.DELETED, now, due_at=now - timedelta(hours=1))
        _room(session, gone, "t-pending", RoomState.PENDING, now, due_at=now - timedelta(hours=2))

    figures = metrics_export.read_store(now)
    assert figures.meetings == {
        "scheduled": 3,
        "creating": 0,
        "ready": 2,
        "deleting": 2,
        "ended": 1,
        "cancelled": 1,
        "failed": 0,
    }
    assert (figures.rooms_live, figures.rooms_overrunning) == (4, 1)
    assert figures.oldest_overdue == 42.0

    samples = scrape(client)
    for state in MeetingState:  # every state listed, zeros included
        assert ("roomkeeper_meetings", (("state", state.value),)) in samples
    assert value(samples, "roomkeeper_meetings", state="scheduled") == 3
    assert value(samples, "roomkeeper_rooms_live") == 4
    assert value(samples, "roomkeeper_rooms_overrunning") == 1
    assert 42 <= value(samples, "roomkeeper_oldest_overdue_deletion_seconds") < 42 + 60
    assert value(samples, "roomkeeper_metrics_source_up", source="database") == 1


def test_nothing_overdue_reads_zero(store_only: str) -> None:
    now = datetime.now(UTC)
    with session_scope() as session:
        meeting = _meeting(session, "ready-0", MeetingState.READY, now)
        _room(session, meeting, "t-ready", RoomState.LIVE, now, due_at=now + timedelta(minutes=1))
    figures = metrics_export.read_store(now)
    assert (figures.rooms_live, figures.rooms_overrunning, figures.oldest_overdue) == (1, 0, 0.0)


# --------------------------------------------------------------------------------------------
# What workers record into Redis.


def _call(method: str, path: str, status: int | None, error: str | None = None) -> whereby.CallRecord:
    return whereby.CallRecord(method, path, status, error, 0.01, None)


@pytest.mark.usefixtures("store_only", "empty_counters")
def test_calls_are_counted_by_operation_and_status(client: TestClient) -> None:
    metrics.record_calls(
        [
            _call("POST", "/meetings", 201),
            _call("POST", "/meetings", 201),
            _call("POST", "/meetings", 429, "RateLimitedError"),
            _call("GET", "/meetings/123", 200),
            _call("GET", "/meetings", 200),
            _call("DELETE", "/meetings/123", 204),
            _call("DELETE", "/meetings/124", 404),
            _call("DELETE", "/meetings/125", None, "APITimeoutError"),
            _call("GET", "/insights/room-sessions", 200),
        ]
    )
    metrics.record_calls([])  # nothing to count: no round trip, no error
    samples = scrape(client)
    counted = {
        (dict(labels)["operation"], dict(labels)["status"]): count
        for (name, labels), count in samples.items()
        if name == "roomkeeper_whereby_calls_total"
    }
    assert counted == {
        ("create", "201"): 2,
        ("create", "429"): 1,
        ("get", "200"): 1,
        ("list", "200"): 1,
        ("delete", "204"): 1,
        ("delete", "404"): 1,
        ("delete", "APITimeoutError"): 1,
        ("insights", "200"): 1,
    }


@pytest.mark.usefixtures("store_only", "empty_counters")
def test_deletion_lag_is_a_histogram(client: TestClient) -> None:
    for seconds in (0.0, 0.05, 0.07, 0.8, 7.0, 1000.0, -1.0):  # a negative lag counts as on time
        metrics.observe_deletion_lag(seconds)
    samples = scrape(client)

    def bucket(le: str) -> float:
        return value(samples, "roomkeeper_deletion_lag_seconds_bucket", le=le)

    assert [bucket(le) for le in ("0.05", "0.1", "0.5", "1.0", "5.0", "10.0", "300.0", "+Inf")] == [
        3,
        4,
        4,
        5,
        5,
        6,
        6,
        7,
    ]
    assert lag_count(samples) == 7
    assert value(samples, "roomkeeper_deletion_lag_seconds_sum") == pytest.approx(1007.92)
    assert len(metrics.LAG_BUCKETS) == 12 and math.isinf(metrics.LAG_BUCKETS[-1])


@pytest.mark.usefixtures("empty_counters")
def test_recording_never_raises_when_redis_is_gone(store_only: str) -> None:
    apply_settings(ROOMKEEPER_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        # A worker's task goes on: neither raises (an exception here would fail the test).
        metrics.record_calls([_call("POST", "/meetings", 201)])
        metrics.observe_deletion_lag(0.2)
        assert metrics_export.read_store().rooms_live == 0  # the store is still read
        with pytest.raises(Exception, match="Connection refused"):
            metrics_export.read_redis()  # while a scrape sees Redis gone
    finally:
        apply_settings(ROOMKEEPER_BROKER_URL=BROKER)
    figures = metrics_export.read_redis()
    assert (figures.calls, figures.lag) == ({}, {})


# --------------------------------------------------------------------------------------------
# The shared point budget.


def test_points_left_follow_the_shared_budget(store_only: str, client: TestClient) -> None:
    assert budget.get_budget().keys[:2] == [metrics.BUDGET_WINDOW_KEY, metrics.BUDGET_PAUSED_KEY]
    apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="100")
    try:
        clear_budget()
        assert value(scrape(client), "roomkeeper_whereby_points_left") == 100
        shared = budget.get_budget()
        shared.acquire("POST", 10)
        shared.acquire("DELETE", 5)
        samples = scrape(client)
        assert value(samples, "roomkeeper_whereby_points_left") == 85
        assert value(samples, "roomkeeper_whereby_paused_seconds") == 0
        shared.pause(30, "test")
        assert 0 < value(scrape(client), "roomkeeper_whereby_paused_seconds") <= 30

        # The limiter off: no budget to report, rather than a made-up figure.
        apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="0")
        samples = scrape(client)
        assert ("roomkeeper_whereby_points_left", ()) not in samples
        assert ("roomkeeper_whereby_paused_seconds", ()) in samples
    finally:
        clear_budget()
        apply_settings(ROOMKEEPER_API_POINTS_PER_MINUTE="0")


# --------------------------------------------------------------------------------------------
# End to end: meetings booked, made and deleted by a real worker against the sandbox.


def test_a_real_worker_s_meetings_calls_and_lags(
    system: str, sandbox: SandboxAdmin, client: TestClient
) -> None:
    before = scrape(client)
    start = soon(2)
    for n in range(3):
        call(
            "rooms.schedule_meeting",
            booking_id=f"metrics-{n}",
            start=iso(start),
            end=iso(start + timedelta(seconds=4)),
        )
    call("rooms.schedule_meeting", booking_id="metrics-later", start=iso(soon(3600)), end=iso(soon(5400)))

    def all_ready() -> bool:
        return all(call("rooms.get_meeting", booking_id=f"metrics-{n}")["state"] == "ready" for n in range(3))

    wait_for(all_ready, timeout=15)
    during = scrape(client)
    assert value(during, "roomkeeper_rooms_live") == 3
    assert value(during, "roomkeeper_meetings", state="ready") == 3
    assert value(during, "roomkeeper_meetings", state="scheduled") == 1

    call("rooms.cancel_meeting", booking_id="metrics-2")

    def all_over() -> bool:
        states = [call("rooms.get_meeting", booking_id=f"metrics-{n}")["state"] for n in range(3)]
        return states == ["ended", "ended", "cancelled"]

    wait_for(all_over, timeout=20)
    after = scrape(client)
    assert value(after, "roomkeeper_meetings", state="ended") == 2
    assert value(after, "roomkeeper_meetings", state="cancelled") == 1
    assert value(after, "roomkeeper_meetings", state="scheduled") == 1
    assert value(after, "roomkeeper_rooms_live") == 0
    assert value(after, "roomkeeper_oldest_overdue_deletion_seconds") == 0

    # Every call the sandbox answered is counted, under its operation and status.
    answered = sandbox.calls()
    for method, operation in (("POST", "create"), ("DELETE", "delete")):
        statuses = {str(c["status"]) for c in answered if c["method"] == method}
        assert statuses, method
        for status in statuses:
            expected = sum(1 for c in answered if c["method"] == method and str(c["status"]) == status)
            assert calls(after, operation, status) - calls(before, operation, status) == expected
    assert calls(after, "create", "201") - calls(before, "create", "201") == 3
    # The rooms deleted at their meetings' end were late by something, recorded by the worker.
    assert lag_count(after) - lag_count(before) >= 2
