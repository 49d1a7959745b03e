"""Calendar feeds in real processes: `roomkeeper` worker and beat, a calendar edited while they run.

Beat's in-process poll finds the feed due and sends `feeds.sync`; each edit is applied within a poll
interval (2 s here)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import delete

from tests.conftest import apply_settings, wait_for
from tests.store.test_feeds import CalendarServer, stamp, vcalendar, vevent
from worker import store
from worker.devtools.harness import ProcessSystem
from worker.devtools.sandbox import SandboxServer
from worker.jobs import booking
from worker.jobs.feeds import registry
from worker.store.models import Feed, FeedOccurrence


@pytest.fixture
def procs(configured: str, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    system = ProcessSystem(
        configured,
        sandbox_server.url,
        sandbox_server.admin_url,
        {"ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS": "127.0.0.1", "ROOMKEEPER_FEED_POLL_INTERVAL_SECONDS": "2"},
    )
    try:
        yield system
    finally:
        system.stop()


def state_of(booking_id: str) -> str | None:
    try:
        return str(booking.get_meeting(booking_id)["state"])
    except booking.UnknownBooking:
        return None


def test_edits_reach_bookings_within_a_poll_interval(
    procs: ProcessSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS", "127.0.0.1")

    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    server = CalendarServer()
    try:
        t = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
        a = vevent("a@x", t, summary="a whereby")
        b = vevent("b@x", t + timedelta(hours=1), summary="b whereby")
        url = server.put("/p.ics", vcalendar(a))
        registry.add_feed(registry.FeedSpec(name="proc", url=url))
        a_id, b_id = f"feed:proc:a@x:{stamp(t)}", f"feed:proc:b@x:{stamp(t + timedelta(hours=1))}"

        procs.start_worker()
        procs.start_beat()
        assert wait_for(lambda: state_of(a_id) == "scheduled", timeout=30)

        server.put("/p.ics", vcalendar(a, b))  # a new event
        assert wait_for(lambda: state_of(b_id) == "scheduled", timeout=20)
        server.put("/p.ics", vcalendar(b))  # an event deleted
        assert wait_for(lambda: state_of(a_id) == "cancelled", timeout=20)
        assert state_of(b_id) == "scheduled"
        # Unchanged since: the next polls are 304s, and still evaluated.
        assert wait_for(lambda: registry.show_feed("proc")["not_modified"] >= 1, timeout=20)
        shown = registry.show_feed("proc")
        assert shown["last_outcome"] == "ok" and shown["downloads"] == 3 and shown["occurrences"] == 1
    finally:
        server.close()
        apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)
