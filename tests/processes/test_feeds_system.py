"""Calendar feeds end to end: beat's poll sends `feeds.sync` through Redis, a real worker syncs, the
sandbox gets a room ahead of each occurrence, and an event deleted from the calendar loses its room."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from config.celery import beat_schedule
from config.settings import get_settings
from tests.conftest import Events, wait_for
from tests.store.test_feeds import CalendarServer, serving_calendars, stamp, vcalendar, vevent
from worker.devtools.sandbox import SandboxAdmin
from worker.jobs import booking
from worker.jobs.feeds import registry, sync
from worker.runtime.app import app


def has_room(booking_id: str) -> bool:
    try:
        return booking.get_meeting(booking_id)["room"] is not None
    except booking.UnknownBooking:
        return False


@pytest.fixture
def served(system: str) -> Iterator[CalendarServer]:
    with serving_calendars() as server:
        yield server


def test_beat_has_the_feed_poll_in_process() -> None:
    app.loader.import_default_modules()
    entry = beat_schedule(get_settings())["poll-feeds"]
    assert entry["task"] == "feeds.poll_due" and entry["options"]["run_in_beat"] is True
    assert "feeds.sync" in app.tasks and "feeds.poll_due" in app.tasks


def test_feed_occurrences_get_rooms_and_lose_them(
    served: CalendarServer, sandbox: SandboxAdmin, events: Events
) -> None:
    start = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    keep = vevent("keep@x", start, minutes=10, summary="whereby keep")
    drop = vevent("drop@x", start + timedelta(seconds=1), minutes=10, summary="whereby drop")
    url = served.put("/live.ics", vcalendar(keep, drop))
    registry.add_feed(
        registry.FeedSpec(name="live", url=url, notify={"task": "tests.events", "queue": events.queue})
    )

    app.tasks["feeds.poll_due"]()  # beat's pass, as beat runs it: sends feeds.sync to the worker
    keep_id, drop_id = (
        f"feed:live:keep@x:{stamp(start)}",
        f"feed:live:drop@x:{stamp(start + timedelta(seconds=1))}",
    )
    wait_for(lambda: has_room(keep_id) and has_room(drop_id), timeout=30)
    assert len([room for room in sandbox.rooms() if not room["deleted_at"]]) == 2
    assert registry.show_feed("live")["last_outcome"] == "ok"

    # The second event is deleted from the calendar: its booking is cancelled, its room deleted.
    served.put("/live.ics", vcalendar(keep))
    assert sync.sync_feed("live")["last_changes"]["cancelled"] == 1
    assert booking.get_meeting(drop_id)["state"] == "cancelled"
    wait_for(lambda: len([room for room in sandbox.rooms() if room["deleted_at"]]) == 1)
    assert booking.get_meeting(keep_id)["room"] is not None
    # The feed's notify got the bookings' ordinary events, by their feed booking ids.
    seen = wait_for(lambda: [e for e in events.drain() if e["event"] == "room.deleted"] and events.seen)
    assert any(e["booking_id"] == keep_id and e["event"] == "room.ready" for e in seen)
    assert any(e["booking_id"] == drop_id and e["event"] == "room.deleted" for e in seen)
