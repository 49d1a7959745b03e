"""Calendar feeds (CONTRACT §5): real ICS files served over HTTP by the test, edited between syncs.

Expansion (zones, DST, exceptions) is checked on a fixed file at fixed instants; the syncs build
their events relative to the real now, since a booking's end must be in the future.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, delete, select
from typer.testing import CliRunner

from tests.conftest import apply_settings
from worker import store
from worker.adapters.calendars import expand
from worker.faces.cli.main import cli
from worker.faces.web.app import create_app
from worker.jobs import booking
from worker.jobs.feeds import registry, sync
from worker.rules import feeds as feed_rules
from worker.store import tokens
from worker.store.models import Feed, FeedOccurrence, Outbox

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ics"


# --------------------------------------------------------------------------------------------
# A calendar server: files editable between syncs, ETag / If-None-Match, counts of each answer.


class CalendarServer:
    def __init__(self) -> None:
        self.files: dict[str, tuple[int, str, str]] = {}  # path -> (status, content type, body)
        self.downloads = 0
        self.not_modified = 0
        self.redirects: dict[str, str] = {}  # path -> Location
        self.headers: dict[str, str] = {}  # sent with every 200 and 304 (Cache-Control)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, ctype, body = server.files.get(self.path, (404, "text/plain", "no such file"))
                data = body.encode()
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                if status == 200 and self.headers.get("If-None-Match") == etag:
                    server.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    for name, value in server.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    return
                if status == 200:
                    server.downloads += 1
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", etag)
                for name, value in server.headers.items() if status == 200 else ():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def put(self, path: str, body: str, status: int = 200, ctype: str = "text/calendar") -> str:
        self.files[path] = (status, ctype, body)
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()


@contextmanager
def serving_calendars() -> Iterator[CalendarServer]:
    """The calendar server, and a store without feeds (conftest empties only its own tables)."""
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    server = CalendarServer()
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    try:
        yield server
    finally:
        server.close()
        apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)


@pytest.fixture
def calendars(configured: str) -> Iterator[CalendarServer]:
    with serving_calendars() as server:
        yield server


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def vevent(
    uid: str, start: datetime, minutes: int = 30, summary: str = "Sync (whereby)", extra: str = ""
) -> str:
    lines = [
        "BEGIN:VEVENT",
        f"UID:{uid}",
        "DTSTAMP:20260101T000000Z",
        f"DTSTART:{stamp(start)}",
        f"DTEND:{stamp(start + timedelta(minutes=minutes))}",
        f"SUMMARY:{summary}",
        *[line for line in extra.splitlines() if line],
        "END:VEVENT",
    ]
    return "\r\n".join(lines)


def vcalendar(*events: str, header: str = "") -> str:
    head = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//roomkeeper tests//EN", *header.splitlines()]
    return "\r\n".join([*head, *events, "END:VCALENDAR", ""])


def base() -> datetime:
    """Tomorrow 09:00 UTC, so every occurrence built from it is in the future."""
    return (datetime.now(UTC) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)


def state(booking_id: str) -> str:
    return str(booking.get_meeting(booking_id)["state"])


def feed_row(name: str) -> Feed:
    with store.session_scope() as session:
        row = session.execute(select(Feed).where(Feed.name == name)).scalar_one()
        session.expunge(row)
        return row


# --------------------------------------------------------------------------------------------
# Expansion, at fixed instants (no store needed).


def test_expansion_of_a_series_across_dst_with_exceptions_and_zones() -> None:
    calendar = expand.parse((FIXTURES / "dst_berlin.ics").read_text())
    found = expand.occurrences(
        calendar,
        "team",
        datetime(2027, 3, 1, tzinfo=UTC),
        datetime(2027, 11, 30, tzinfo=UTC),
        match="WHEREBY",
        timezone="Europe/Berlin",
    )
    spans = {bid: (o.start.strftime("%m-%d %H:%M"), o.end.strftime("%H:%M")) for bid, o in found.items()}
    assert spans == {
        # COUNT=6 weekly at 09:00 Berlin: 08:00Z before the DST change of 28 March 2027, 07:00Z after.
        "feed:team:weekly-standup@example.com:20270315T080000Z": ("03-15 08:00", "08:30"),
        "feed:team:weekly-standup@example.com:20270322T080000Z": ("03-22 08:00", "08:30"),
        # Moved by an override written in New York time; its id keeps the RECURRENCE-ID.
        "feed:team:weekly-standup@example.com:20270329T070000Z": ("03-29 09:00", "10:00"),
        # RDATE adds one; EXDATE removes 5 April; 12 April is a cancelled override.
        "feed:team:weekly-standup@example.com:20270401T120000Z": ("04-01 12:00", "12:30"),
        "feed:team:weekly-standup@example.com:20270419T070000Z": ("04-19 07:00", "07:30"),
        # Floating 15:00 in the feed's zone (Berlin, winter): 14:00Z.
        "feed:team:floating@example.com:20270317T140000Z": ("03-17 14:00", "15:00"),
        # UNTIL series across the end of DST (31 October 2027); matched by LOCATION.
        "feed:team:until-series@example.com:20271020T080000Z": ("10-20 08:00", "09:00"),
        "feed:team:until-series@example.com:20271027T080000Z": ("10-27 08:00", "09:00"),
        "feed:team:until-series@example.com:20271103T090000Z": ("11-03 09:00", "10:00"),
    }
    # Without --match every timed event counts (Lunch too), never the all-day or cancelled ones.
    everything = expand.occurrences(
        calendar, "team", datetime(2027, 3, 1, tzinfo=UTC), datetime(2027, 11, 30, tzinfo=UTC)
    )
    assert "feed:team:other@example.com:20270318T150000Z" in everything
    assert not any("allday" in bid or "cancelled-event" in bid for bid in everything)
    # Floating times without X-WR-TIMEZONE and with the default zone: UTC.
    assert "feed:team:floating@example.com:20270317T150000Z" in everything


def test_outlook_export_with_a_windows_zone_name_across_dst() -> None:
    calendar = expand.parse((FIXTURES / "outlook_windows_zone.ics").read_text())
    found = expand.occurrences(
        calendar, "o", datetime(2027, 10, 1, tzinfo=UTC), datetime(2027, 12, 1, tzinfo=UTC), match="whereby"
    )
    # 10:00 W. Europe: 08:00Z in summer time, 09:00Z after 31 October; UNTIL includes 10 November.
    assert [o.start.strftime("%m-%d %H:%M") for o in sorted(found.values(), key=lambda o: o.start)] == [
        "10-20 08:00",
        "10-27 08:00",
        "11-03 09:00",
        "11-10 09:00",
    ]
    assert all(len(bid) <= 200 for bid in found)


def test_window_limits_and_x_wr_timezone() -> None:
    text = vcalendar(
        vevent("daily", datetime(2027, 1, 4, 9, tzinfo=UTC), extra="RRULE:FREQ=DAILY;COUNT=30"),
        "BEGIN:VEVENT\r\nUID:float\r\nDTSTAMP:20260101T000000Z\r\nDTSTART:20270105T100000\r\n"
        "DTEND:20270105T110000\r\nSUMMARY:f\r\nEND:VEVENT",
        header="X-WR-TIMEZONE:America/New_York",
    )
    calendar = expand.parse(text)
    now = datetime(2027, 1, 10, 9, 15, tzinfo=UTC)  # the occurrence of the 10th has started, not ended
    found = expand.occurrences(calendar, "f", now, now + timedelta(days=3))
    assert sorted(found) == [
        "feed:f:daily:20270110T090000Z",
        "feed:f:daily:20270111T090000Z",
        "feed:f:daily:20270112T090000Z",
        "feed:f:daily:20270113T090000Z",
    ]
    later = expand.occurrences(
        calendar, "f", datetime(2027, 1, 5, tzinfo=UTC), datetime(2027, 1, 6, tzinfo=UTC)
    )
    assert "feed:f:float:20270105T150000Z" in later  # 10:00 New York


def test_booking_id_of_a_very_long_uid_is_hashed_and_fits() -> None:
    uid = "x" * 400
    bid = expand.booking_id("team", uid, datetime(2027, 1, 1, 9, tzinfo=UTC))
    assert len(bid) <= 200
    assert bid == f"feed:team:sha256-{hashlib.sha256(uid.encode()).hexdigest()[:32]}:20270101T090000Z"
    assert expand.booking_id("t", "abc", datetime(2027, 1, 1, 9, tzinfo=UTC)) == "feed:t:abc:20270101T090000Z"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
        ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:a\r\n", "truncated"),
        ("hello", "not iCalendar"),
    ],
)
def test_parse_refuses_what_is_not_a_complete_calendar(text: str, why: str) -> None:
    with pytest.raises(expand.FeedContentError, match=why):
        expand.parse(text)


# --------------------------------------------------------------------------------------------
# Syncs against the store (real database, sandbox), served over HTTP.


def test_sync_books_moves_cancels_and_re_expands_on_304(configured: str, calendars: CalendarServer) -> None:
    t = base()
    events = {
        "series": vevent("series@x", t, extra="RRULE:FREQ=DAILY;COUNT=5"),
        "single": vevent("single@x", t + timedelta(hours=3), summary="1:1 whereby"),
        "skip": vevent("lunch@x", t + timedelta(hours=4), summary="Lunch"),
        "allday": "BEGIN:VEVENT\r\nUID:allday@x\r\nDTSTAMP:20260101T000000Z\r\n"
        f"DTSTART;VALUE=DATE:{t.strftime('%Y%m%d')}\r\nSUMMARY:whereby day\r\nEND:VEVENT",
    }
    url = calendars.put("/team.ics", vcalendar(*events.values()))
    registry.add_feed(registry.FeedSpec(name="team", url=url, match="WHEREBY", horizon_days=3))

    result = sync.sync_feed("team")
    assert result["last_outcome"] == "ok", result
    horizon_end = datetime.now(UTC) + timedelta(days=3)
    ids = {
        f"feed:team:series@x:{stamp(t + timedelta(days=d))}"
        for d in range(5)
        if t + timedelta(days=d) < horizon_end
    }
    single = f"feed:team:single@x:{stamp(t + timedelta(hours=3))}"
    shown = registry.show_feed("team")
    held = {b["booking_id"] for b in shown["bookings"]}
    assert single in held and ids <= held
    assert not any("lunch" in b or "allday" in b for b in held)
    assert result["last_changes"]["booked"] == len(held)
    for bid in held:
        assert state(bid) == "scheduled"
    meeting = booking.get_meeting(single)
    assert meeting["metadata"]["feed"] == "team" and meeting["metadata"]["uid"] == "single@x"
    assert calendars.downloads == 1

    # Unchanged feed: a 304, nothing downloaded, nothing changed, still evaluated.
    again = sync.sync_feed("team")
    assert again["last_outcome"] == "ok" and calendars.not_modified == 1 and calendars.downloads == 1
    assert again["last_changes"] == {**again["last_changes"], "booked": 0, "rescheduled": 0, "cancelled": 0}

    # Edit the calendar: the series' first day moves an hour on (a RECURRENCE-ID override), its
    # second day goes (EXDATE), the one-off event moves (its start is in its booking_id: the old
    # booking is cancelled, a new one made), a new event appears.
    second = t + timedelta(days=1)
    override = vevent(
        "series@x", t + timedelta(hours=1), summary="Sync moved (whereby)", extra=f"RECURRENCE-ID:{stamp(t)}"
    )
    events["series"] = vevent("series@x", t, extra=f"RRULE:FREQ=DAILY;COUNT=5\r\nEXDATE:{stamp(second)}")
    events["override"] = override
    events["single"] = vevent("single@x", t + timedelta(hours=5), summary="1:1 whereby")
    events["new"] = vevent("new@x", t + timedelta(hours=6), summary="new whereby")
    calendars.put("/team.ics", vcalendar(*events.values()))
    edited = sync.sync_feed("team")
    assert edited["last_outcome"] == "ok", edited
    assert edited["last_changes"]["rescheduled"] == 1
    assert edited["last_changes"]["cancelled"] == 2
    assert edited["last_changes"]["booked"] == 2
    moved = booking.get_meeting(f"feed:team:series@x:{stamp(t)}")  # the id keeps the RECURRENCE-ID
    assert moved["start"].startswith((t + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"))
    assert state(f"feed:team:series@x:{stamp(second)}") == "cancelled"
    assert state(single) == "cancelled"
    assert state(f"feed:team:single@x:{stamp(t + timedelta(hours=5))}") == "scheduled"
    assert state(f"feed:team:new@x:{stamp(t + timedelta(hours=6))}") == "scheduled"

    # The event deleted from the calendar: cancelled.
    del events["new"]
    calendars.put("/team.ics", vcalendar(*events.values()))
    assert sync.sync_feed("team")["last_changes"]["cancelled"] == 1
    assert state(f"feed:team:new@x:{stamp(t + timedelta(hours=6))}") == "cancelled"
    history = registry.show_feed("team")["history"]
    assert [h["outcome"] for h in history] == ["ok"] * 4

    # A 304 still moves the horizon: two days later the series' later days are booked.
    later = sync.sync_feed("team", now=datetime.now(UTC) + timedelta(days=2))
    assert later["last_outcome"] == "ok" and calendars.downloads == 3 and calendars.not_modified == 2
    assert later["last_changes"]["booked"] >= 1
    fourth = f"feed:team:series@x:{stamp(t + timedelta(days=3))}"
    assert state(fourth) == "scheduled"


def test_a_feed_that_breaks_changes_nothing_and_is_reported(
    configured: str, calendars: CalendarServer
) -> None:
    t = base()
    good = vcalendar(*(vevent(f"e{i}@x", t + timedelta(hours=i)) for i in range(6)))
    url = calendars.put("/b.ics", good)
    notify = {"task": "tests.feed_events", "queue": "feed-events"}
    registry.add_feed(registry.FeedSpec(name="b", url=url, notify=notify))
    assert sync.sync_feed("b")["last_outcome"] == "ok"
    held = {b["booking_id"] for b in registry.show_feed("b")["bookings"]}
    assert len(held) == 6

    breakages = [
        (500, "text/plain", "oops", "HTTP 500"),
        (200, "text/html", "<html><body>login</body></html>", "text/html"),
        (200, "text/calendar", "<!doctype html><html>", "HTML"),
        (200, "text/calendar", good[: len(good) // 2], "truncated"),
        (404, "text/plain", "gone", "HTTP 404"),
    ]
    for status, ctype, body, why in breakages:
        calendars.put("/b.ics", body, status=status, ctype=ctype)
        result = sync.sync_feed("b")
        assert result["last_outcome"] == "failed" and why in result["last_detail"], (why, result)
        assert {b["booking_id"] for b in registry.show_feed("b")["bookings"]} == held
        assert all(state(bid) == "scheduled" for bid in held)

    # Most occurrences vanish at once: suspicious, nothing cancelled.
    calendars.put("/b.ics", vcalendar(vevent("e0@x", t)))
    result = sync.sync_feed("b")
    assert result["last_outcome"] == "suspicious" and "5 of the 6" in result["last_detail"]
    assert all(state(bid) == "scheduled" for bid in held)

    with store.session_scope() as session:
        sent = [
            row.kwargs
            for row in session.execute(
                select(Outbox).where(Outbox.booking_id == "feed:b").order_by(col(Outbox.id))
            ).scalars()
        ]
    # One event as the feed starts failing (five failed polls), one as it turns suspicious.
    assert [k["event"] for k in sent] == ["feed.failed", "feed.suspicious"]
    assert all(k["feed"] == "b" for k in sent)
    assert "HTTP 500" in sent[0]["detail"]
    shown = registry.show_feed("b")
    assert shown["last_outcome"] == "suspicious"
    assert [h["outcome"] for h in shown["history"]] == ["ok"] + ["failed"] * 5 + ["suspicious"]

    # The operator accepts the loss: now the five are cancelled, and the feed has recovered.
    forced = sync.sync_feed("b", force=True)
    assert forced["last_outcome"] == "ok" and forced["last_changes"]["cancelled"] == 5
    assert sorted(state(bid) for bid in held) == ["cancelled"] * 5 + ["scheduled"]
    assert feed_events("b") == ["feed.failed", "feed.suspicious", "feed.recovered"]


def feed_events(name: str) -> list[str]:
    with store.session_scope() as session:
        return [
            row.kwargs["event"]
            for row in session.execute(
                select(Outbox).where(Outbox.booking_id == f"feed:{name}").order_by(col(Outbox.id))
            ).scalars()
        ]


@pytest.mark.parametrize(
    ("previous", "outcome", "event"),
    [
        (None, "ok", None),
        ("ok", "ok", None),
        (None, "failed", "feed.failed"),
        ("ok", "failed", "feed.failed"),
        ("failed", "failed", None),
        ("failed", "suspicious", "feed.suspicious"),
        ("suspicious", "suspicious", None),
        ("suspicious", "failed", "feed.failed"),
        ("failed", "ok", "feed.recovered"),
        ("suspicious", "ok", "feed.recovered"),
        (None, "suspicious", "feed.suspicious"),
    ],
)
def test_feed_events_are_sent_on_a_change_of_state_only(
    previous: str | None, outcome: str, event: str | None
) -> None:
    assert feed_rules.feed_event(previous, outcome) == event


def test_a_feed_broken_for_a_day_sends_one_failed_and_one_recovered(
    configured: str, calendars: CalendarServer
) -> None:
    t = base()
    good = vcalendar(vevent("d@x", t + timedelta(days=2)))
    url = calendars.put("/day.ics", good)
    notify = {"task": "tests.feed_events", "queue": "feed-events"}
    registry.add_feed(registry.FeedSpec(name="day", url=url, notify=notify, horizon_days=5))
    start = datetime.now(UTC)
    assert sync.sync_feed("day", now=start)["last_outcome"] == "ok"

    # A day of polls every 5 minutes (the default interval) on a simulated clock: 288 failed polls.
    calendars.put("/day.ics", "down for maintenance", status=503, ctype="text/plain")
    polls = [start + timedelta(minutes=5 * i) for i in range(1, 289)]
    for moment in polls:
        assert sync.sync_feed("day", now=moment)["last_outcome"] == "failed"
    assert feed_events("day") == ["feed.failed"]
    row = feed_row("day")
    assert row.last_outcome == "failed" and row.last_poll_at == polls[-1]

    healed = polls[-1] + timedelta(minutes=5)
    calendars.put("/day.ics", good)
    assert sync.sync_feed("day", now=healed)["last_outcome"] == "ok"
    assert sync.sync_feed("day", now=healed + timedelta(minutes=5))["last_outcome"] == "ok"
    assert feed_events("day") == ["feed.failed", "feed.recovered"]
    with store.session_scope() as session:
        recovered = (
            session.execute(
                select(Outbox).where(Outbox.booking_id == "feed:day").order_by(col(Outbox.id).desc())
            )
            .scalars()
            .first()
        )
        assert recovered is not None
        assert recovered.kwargs["feed"] == "day" and "1 occurrence(s)" in recovered.kwargs["detail"]

    # Broken again later: a new run of failures, one new event.
    calendars.put("/day.ics", "gone", status=404, ctype="text/plain")
    for i in range(2, 5):
        sync.sync_feed("day", now=healed + timedelta(minutes=5 * i))
    assert feed_events("day") == ["feed.failed", "feed.recovered", "feed.failed"]


@pytest.mark.parametrize(
    ("cache_control", "wait"),
    [
        (None, 300),  # no header: the feed's interval (ROOMKEEPER_FEED_POLL_INTERVAL_SECONDS)
        ("max-age=1800", 1800),  # not read again before it expires
        ("public, max-age=60", 300),  # never sooner than the interval
        ("max-age=604800", feed_rules.MAX_AGE_CAP_SECONDS),  # a week: capped, the horizon must move on
        ("no-cache, max-age=1800", 300),
        ("no-store", 300),
        ("max-age=soon", 300),
    ],
)
def test_ics_cache_control_max_age_delays_the_next_poll(
    configured: str, calendars: CalendarServer, cache_control: str | None, wait: int
) -> None:
    url = calendars.put("/cc.ics", vcalendar(vevent("cc@x", base())))
    if cache_control is not None:
        calendars.headers["Cache-Control"] = cache_control
    registry.add_feed(registry.FeedSpec(name="cc", url=url))
    sent: list[str] = []
    assert sync.poll_due(sent.append) == ["cc"]  # beat moves it one interval on, and sends it
    for read in ("downloaded", "not modified (304)"):  # a 304 renews the freshness too
        now = datetime.now(UTC)
        result = sync.sync_feed("cc", now=now)
        assert result["last_outcome"] == "ok" and read in result["last_detail"], result
        next_poll = feed_row("cc").next_poll_at
        assert next_poll is not None
        assert abs((next_poll - now).total_seconds() - wait) < 1, (cache_control, next_poll - now)
    assert sync.poll_due(sent.append) == []  # not due before then
    assert calendars.downloads == 1 and calendars.not_modified == 1


def test_add_refuses_bad_input_and_stores_nothing(configured: str, calendars: CalendarServer) -> None:
    with pytest.raises(registry.FeedError) as refused:
        registry.add_feed(
            registry.FeedSpec(
                name="bad name!",
                url="http://10.0.0.1/cal.ics",
                horizon_days=0,
                room={"room_mode": "huge"},
                timezone="Mars/Olympus",
            )
        )
    message = str(refused.value)
    for field in ("name:", "url:", "horizon_days:", "room.room_mode:", "timezone:"):
        assert field in message
    with pytest.raises(registry.FeedError, match="url: must not carry credentials"):
        registry.add_feed(registry.FeedSpec(name="c", url="http://user:secret@127.0.0.1/x.ics"))
    with pytest.raises(registry.FeedError, match="url: must be at most 2000 characters"):
        registry.add_feed(registry.FeedSpec(name="n", url="http://127.0.0.1/\x00.ics"))
    assert registry.list_feeds() == []
    url = calendars.put("/d.ics", vcalendar())
    registry.add_feed(registry.FeedSpec(name="d", url=url))
    with pytest.raises(registry.FeedError, match="exists already"):
        registry.add_feed(registry.FeedSpec(name="d", url=url))
    with pytest.raises(registry.UnknownFeed):
        sync.sync_feed("nope")


def test_beat_poll_sends_each_due_feed_once(configured: str, calendars: CalendarServer) -> None:
    url = calendars.put("/p.ics", vcalendar())
    registry.add_feed(registry.FeedSpec(name="p1", url=url))
    registry.add_feed(registry.FeedSpec(name="p2", url=url))
    sent: list[str] = []
    assert sorted(sync.poll_due(sent.append)) == ["p1", "p2"]
    assert sync.poll_due(sent.append) == []  # not due again for one interval
    assert sorted(sent) == ["p1", "p2"]
    assert feed_row("p1").next_poll_at is not None


def test_a_second_sync_while_one_holds_the_claim_is_busy(configured: str, calendars: CalendarServer) -> None:
    url = calendars.put("/c.ics", vcalendar())
    registry.add_feed(registry.FeedSpec(name="c", url=url))
    assert sync._claim("c", datetime.now(UTC)) is not None
    assert sync.sync_feed("c")["last_outcome"] == "busy"


def test_cli_and_http(configured: str, calendars: CalendarServer) -> None:
    t = base()
    url = calendars.put("/h.ics", vcalendar(vevent("h@x", t)))
    runner = CliRunner()
    added = runner.invoke(cli, ["feeds", "add", "cli", url, "--match", "whereby", "--horizon-days", "5"])
    assert added.exit_code == 0, added.output
    synced = runner.invoke(cli, ["feeds", "sync", "cli"])
    assert synced.exit_code == 0, synced.output
    assert json.loads(synced.stdout)["last_changes"]["booked"] == 1
    listed = runner.invoke(cli, ["feeds", "list"])
    assert "cli" in listed.output and "+1" in listed.output
    shown = json.loads(runner.invoke(cli, ["feeds", "show", "cli"]).stdout)
    assert shown["bookings"][0]["booking_id"] == f"feed:cli:h@x:{stamp(t)}"
    bad = runner.invoke(cli, ["feeds", "add", "x", "ftp://nowhere/cal.ics"])
    assert bad.exit_code == 1 and "url:" in bad.output

    token = tokens.create("feeds-tests")
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app()) as web:
        assert web.get("/v1/feeds").status_code == 401
        made = web.post("/v1/feeds", json={"name": "web", "url": url, "horizon_days": 5}, headers=auth)
        assert made.status_code == 201, made.text
        refused = web.post("/v1/feeds", json={"name": "web2", "url": "http://10.1.1.1/x"}, headers=auth)
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "url"
        assert web.post("/v1/feeds", json={"name": "web", "url": url}, headers=auth).status_code == 409
        assert {f["name"] for f in web.get("/v1/feeds", headers=auth).json()["results"]} == {"cli", "web"}
        did = web.post("/v1/feeds/web/sync", headers=auth)
        assert did.status_code == 200 and did.json()["last_changes"]["booked"] == 1
        assert web.get("/v1/feeds/web", headers=auth).json()["occurrences"] == 1
        assert web.get("/v1/feeds/nope", headers=auth).status_code == 404
        gone = web.delete("/v1/feeds/web", headers=auth)
        assert gone.status_code == 200 and gone.json()["cancelled"] == 1
        assert state(f"feed:web:h@x:{stamp(t)}") == "cancelled"
        assert web.get("/v1/feeds/web", headers=auth).status_code == 404
    removed = runner.invoke(cli, ["feeds", "remove", "cli"])
    assert removed.exit_code == 0 and "1 booking(s) cancelled" in removed.output


def test_redirects_are_followed_only_where_the_outbound_rules_allow(
    configured: str, calendars: CalendarServer
) -> None:
    t = base()
    calendars.put("/real.ics", vcalendar(vevent("r@x", t)))
    calendars.redirects["/moved.ics"] = "/real.ics"
    calendars.redirects["/inside.ics"] = "http://10.0.0.1/cal.ics"
    registry.add_feed(registry.FeedSpec(name="moved", url=calendars.url + "/moved.ics"))
    registry.add_feed(registry.FeedSpec(name="inside", url=calendars.url + "/inside.ics"))
    assert sync.sync_feed("moved")["last_changes"]["booked"] == 1
    refused = sync.sync_feed("inside")
    assert (
        refused["last_outcome"] == "failed" and "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS" in refused["last_detail"]
    )


@pytest.mark.parametrize(
    "body",
    [
        {"name": "a\x00b", "url": "http://127.0.0.1/x.ics"},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "timezone": "Europe/\x00"},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "match": "\ud800"},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "username": "a\x00", "password_env": "X"},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "username": "a", "password": "p\x00"},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "room": {"room_mode": 3}},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "notify": {"task": "t"}},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "horizon_days": 10**12},
        {"name": "ok", "url": "http://127.0.0.1/x.ics", "password_env": "1BAD", "username": "u"},
        {"name": "ok", "url": ["not", "a", "string"]},
        {"name": "ok"},
    ],
)
def test_http_bad_bodies_are_422_and_store_nothing(
    configured: str, calendars: CalendarServer, body: dict[str, Any]
) -> None:
    token = tokens.create(f"bad-{hashlib.sha256(repr(body).encode()).hexdigest()[:8]}")
    with TestClient(create_app()) as web:
        answer = web.post(
            "/v1/feeds",
            content=json.dumps(body),  # escapes a lone surrogate, as a JSON client may send it
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"]
    assert registry.list_feeds() == []
