"""A CalDAV feed against a real Radicale server run by the test, with a password from the environment;
reads of only what changed (sync-token, ctag), and a server that offers neither."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import caldav
import httpx
import pytest
from sqlmodel import delete

from tests.conftest import apply_settings
from tests.store.test_feeds import base, feed_row, stamp, vcalendar, vevent
from worker import store
from worker.adapters import outbound
from worker.adapters.calendars import caldav as caldav_read
from worker.jobs import booking
from worker.jobs.feeds import registry, sync
from worker.store.models import Feed, FeedOccurrence

PASSWORD = "radicale-pass-7f3e"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def radicale(tmp_path: Path, configured: str) -> Iterator[str]:
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    (tmp_path / "users").write_text(f"alice:{PASSWORD}\n")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radicale",
            f"--server-hosts=127.0.0.1:{port}",
            f"--storage-filesystem-folder={tmp_path / 'collections'}",
            "--auth-type=htpasswd",
            f"--auth-htpasswd-filename={tmp_path / 'users'}",
            "--auth-htpasswd-encryption=plain",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url + "/", timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    os.environ["TEST_CALDAV_PASSWORD"] = PASSWORD
    yield url
    os.environ.pop("TEST_CALDAV_PASSWORD", None)
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)
    process.terminate()
    process.wait(10)


def test_caldav_calendar_becomes_bookings(radicale: str, caplog: pytest.LogCaptureFixture) -> None:
    t = base()
    client = caldav.DAVClient(url=radicale, username="alice", password=PASSWORD)
    calendar = client.principal().make_calendar(name="team", cal_id="team")
    calendar_url = str(calendar.url)
    calendar.save_event(vcalendar(vevent("dav-series@x", t, extra="RRULE:FREQ=DAILY;COUNT=2")))
    single = calendar.save_event(vcalendar(vevent("dav-one@x", t + timedelta(hours=2))))
    calendar.save_event(vcalendar(vevent("dav-lunch@x", t + timedelta(hours=3), summary="Lunch")))

    registry.add_feed(
        registry.FeedSpec(
            name="dav",
            url=calendar_url,
            match="whereby",
            username="alice",
            password_env="TEST_CALDAV_PASSWORD",
            horizon_days=5,
        )
    )
    result = sync.sync_feed("dav")
    assert result["last_outcome"] == "ok", result
    expected = {
        f"feed:dav:dav-series@x:{stamp(t)}",
        f"feed:dav:dav-series@x:{stamp(t + timedelta(days=1))}",
        f"feed:dav:dav-one@x:{stamp(t + timedelta(hours=2))}",
    }
    assert {b["booking_id"] for b in registry.show_feed("dav")["bookings"]} == expected
    for bid in expected:
        assert booking.get_meeting(bid)["state"] == "scheduled"

    # Deleted on the server: cancelled at the next sync.
    single.delete()
    assert sync.sync_feed("dav")["last_changes"]["cancelled"] == 1
    assert booking.get_meeting(f"feed:dav:dav-one@x:{stamp(t + timedelta(hours=2))}")["state"] == "cancelled"

    # A wrong password: the read fails, nothing changes, and the password is nowhere.
    os.environ["TEST_CALDAV_PASSWORD"] = "wrong-" + PASSWORD
    failed = sync.sync_feed("dav")
    assert failed["last_outcome"] == "failed"
    assert booking.get_meeting(f"feed:dav:dav-series@x:{stamp(t)}")["state"] == "scheduled"
    shown = str(registry.show_feed("dav")) + str(registry.list_feeds()) + caplog.text
    assert PASSWORD not in shown
    assert "TEST_CALDAV_PASSWORD" in str(registry.show_feed("dav"))


def test_caldav_password_stored_encrypted(radicale: str) -> None:
    from cryptography.fernet import Fernet
    from sqlalchemy import text

    t = base()
    client = caldav.DAVClient(url=radicale, username="alice", password=PASSWORD)
    calendar = client.principal().make_calendar(name="enc", cal_id="enc")
    calendar.save_event(vcalendar(vevent("enc@x", t)))
    spec = registry.FeedSpec(name="enc", url=str(calendar.url), username="alice", password=PASSWORD)
    with pytest.raises(registry.FeedError, match="password: storing a password needs ROOMKEEPER_SECRET_KEY"):
        registry.add_feed(spec)
    apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
    try:
        added = registry.add_feed(spec)
        assert added["password"] == "stored encrypted" and PASSWORD not in str(added)
        result = sync.sync_feed("enc")
        assert result["last_outcome"] == "ok" and result["last_changes"]["booked"] == 1
        with store.session_scope() as session:
            row = session.execute(text("SELECT * FROM feed WHERE name = 'enc'")).one()
        assert PASSWORD not in str(tuple(row))
        assert PASSWORD not in str(registry.show_feed("enc")) + str(registry.list_feeds())
        # Another key cannot read it: the sync fails and changes nothing.
        apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
        failed = sync.sync_feed("enc")
        assert failed["last_outcome"] == "failed" and "decrypt" in failed["last_detail"]
        assert booking.get_meeting(f"feed:enc:enc@x:{stamp(t)}")["state"] == "scheduled"
    finally:
        apply_settings(ROOMKEEPER_SECRET_KEY=None)


# --------------------------------------------------------------------------------------------
# Reading only what changed.


class Spy:
    """Every request the CalDAV reader sends (through the one guarded `outbound.request`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[dict[str, Any]] = []
        monkeypatch.setattr(caldav_read, "request", self)

    def __call__(self, method: str, url: str, *args: Any, **kwargs: Any) -> outbound.Answer:
        answer = outbound.request(method, url, *args, **kwargs)
        content = kwargs.get("content") or b""
        self.sent.append(
            {
                "method": method,
                "report": "sync-collection" if b"sync-collection" in content else "calendar-query",
                "status": answer.status,
                "events": answer.body.count(b"BEGIN:VEVENT"),
                "removed": answer.body.count(b"404 Not Found"),
            }
        )
        return answer

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


def _dav_feed(radicale: str, name: str) -> Any:
    client = caldav.DAVClient(url=radicale, username="alice", password=PASSWORD)
    calendar = client.principal().make_calendar(name=name, cal_id=name)
    registry.add_feed(
        registry.FeedSpec(
            name=name,
            url=str(calendar.url),
            username="alice",
            password_env="TEST_CALDAV_PASSWORD",
            horizon_days=5,
        )
    )
    return calendar


def test_caldav_sync_token_reads_only_what_changed(radicale: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = base()
    calendar = _dav_feed(radicale, "tok")
    for uid, hours in (("a@x", 1), ("b@x", 2), ("c@x", 3)):
        calendar.save_event(vcalendar(vevent(uid, t + timedelta(hours=hours))))
    spy = Spy(monkeypatch)

    first = sync.sync_feed("tok")
    assert first["last_outcome"] == "ok" and first["last_changes"]["booked"] == 3, first
    assert [(r["method"], r["report"]) for r in spy.sent][-1] == ("REPORT", "sync-collection")
    assert spy.take()[-1]["events"] == 3
    assert (feed_row("tok").etag or "").startswith("sync-token:")

    # Nothing changed: one REPORT with the last token, answered without a single event.
    unchanged = sync.sync_feed("tok")
    assert unchanged["last_outcome"] == "ok" and "not modified (sync-token)" in unchanged["last_detail"]
    assert spy.take() == [
        {"method": "REPORT", "report": "sync-collection", "status": 207, "events": 0, "removed": 0}
    ]
    assert unchanged["not_modified"] == 1 and unchanged["last_changes"]["unchanged"] == 3

    # One event moved, one deleted, one added: one REPORT holding the two changed events and the
    # removed one, and the bookings follow.
    calendar.save_event(vcalendar(vevent("a@x", t + timedelta(hours=4))))
    calendar.event_by_uid("b@x").delete()
    calendar.save_event(vcalendar(vevent("d@x", t + timedelta(hours=5))))
    changed = sync.sync_feed("tok")
    assert changed["last_outcome"] == "ok", changed
    assert spy.take() == [
        {"method": "REPORT", "report": "sync-collection", "status": 207, "events": 2, "removed": 1}
    ]
    assert changed["last_changes"]["booked"] == 2 and changed["last_changes"]["cancelled"] == 2
    assert changed["last_changes"]["unchanged"] == 1
    assert "2 changed and 1 removed" in changed["last_detail"]
    held = {b["booking_id"] for b in registry.show_feed("tok")["bookings"]}
    assert held == {
        f"feed:tok:a@x:{stamp(t + timedelta(hours=4))}",
        f"feed:tok:c@x:{stamp(t + timedelta(hours=3))}",
        f"feed:tok:d@x:{stamp(t + timedelta(hours=5))}",
    }
    assert booking.get_meeting(f"feed:tok:b@x:{stamp(t + timedelta(hours=2))}")["state"] == "cancelled"

    # A token the server no longer knows: it refuses it, and the calendar is read whole instead.
    with store.session_scope() as session:
        row = session.get(Feed, feed_row("tok").id)
        assert row is not None
        row.etag = "sync-token:http://radicale.org/ns/sync/" + "0" * 64
    again = sync.sync_feed("tok")
    assert again["last_outcome"] == "ok" and again["last_changes"]["unchanged"] == 3, again
    sent = spy.take()
    assert [(r["method"], r["status"]) for r in sent] == [("REPORT", 403), ("PROPFIND", 207), ("REPORT", 207)]
    assert sent[-1]["events"] == 3


def test_caldav_ctag_reads_the_calendar_only_when_it_changed(
    radicale: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(caldav_read, "USE_SYNC_TOKEN", False)  # as a server with a ctag only
    t = base()
    calendar = _dav_feed(radicale, "ctag")
    calendar.save_event(vcalendar(vevent("a@x", t + timedelta(hours=1))))
    spy = Spy(monkeypatch)

    assert sync.sync_feed("ctag")["last_changes"]["booked"] == 1
    assert [(r["method"], r["report"], r["events"]) for r in spy.take()] == [
        ("PROPFIND", "calendar-query", 0),
        ("REPORT", "calendar-query", 1),
    ]
    assert (feed_row("ctag").etag or "").startswith("ctag:")

    unchanged = sync.sync_feed("ctag")
    assert unchanged["last_outcome"] == "ok" and "not modified (ctag)" in unchanged["last_detail"]
    assert [r["method"] for r in spy.take()] == ["PROPFIND"]

    calendar.save_event(vcalendar(vevent("b@x", t + timedelta(hours=2))))
    changed = sync.sync_feed("ctag")
    assert changed["last_changes"]["booked"] == 1 and changed["last_changes"]["unchanged"] == 1
    assert [(r["method"], r["events"]) for r in spy.take()] == [("PROPFIND", 0), ("REPORT", 2)]


class PlainCalDAV:
    """A CalDAV server with neither sync-token nor ctag: PROPFIND finds no such property."""

    def __init__(self) -> None:
        self.events: dict[str, str] = {}
        self.reports = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: str) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = body.encode()
                self.send_response(207)
                self.send_header("Content-Type", "application/xml; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PROPFIND(self) -> None:
                self._answer(
                    '<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" '
                    'xmlns:CS="http://calendarserver.org/ns/"><D:response><D:href>/cal/</D:href>'
                    "<D:propstat><D:prop><D:sync-token/><CS:getctag/></D:prop>"
                    "<D:status>HTTP/1.1 404 Not Found</D:status></D:propstat></D:response></D:multistatus>"
                )

            def do_REPORT(self) -> None:
                server.reports += 1
                responses = "".join(
                    f"<D:response><D:href>/cal/{name}.ics</D:href><D:propstat><D:prop>"
                    f"<C:calendar-data>{body}</C:calendar-data></D:prop>"
                    "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
                    for name, body in server.events.items()
                )
                self._answer(
                    '<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" '
                    f'xmlns:C="urn:ietf:params:xml:ns:caldav">{responses}</D:multistatus>'
                )

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cal/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_caldav_without_ctag_or_sync_token_is_read_whole_every_poll(
    configured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    server = PlainCalDAV()
    try:
        t = base()
        server.events["a"] = vcalendar(vevent("a@x", t + timedelta(hours=1)))
        registry.add_feed(registry.FeedSpec(name="plain", url=server.url, caldav=True, horizon_days=5))
        spy = Spy(monkeypatch)
        first = sync.sync_feed("plain")
        assert first["last_changes"]["booked"] == 1, first
        assert "no ctag or sync-token" in first["last_detail"]
        assert feed_row("plain").etag is None
        second = sync.sync_feed("plain")
        assert second["last_changes"]["unchanged"] == 1 and server.reports == 2
        server.events["b"] = vcalendar(vevent("b@x", t + timedelta(hours=2)))
        third = sync.sync_feed("plain")
        assert third["last_changes"]["booked"] == 1 and server.reports == 3
        assert [r["method"] for r in spy.sent] == ["PROPFIND", "REPORT"] * 3
    finally:
        server.close()
        apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)


def test_what_an_older_release_kept_means_a_full_read() -> None:
    resources = {"/c/a.ics": vcalendar(vevent("a@x", base()))}
    assert caldav_read.load("ctag:1", caldav_read.dump(resources)) == ("ctag:1", resources)
    assert caldav_read.load(None, caldav_read.dump(resources)) == (None, None)
    assert caldav_read.load("ctag:1", vcalendar(vevent("a@x", base()))) == (None, None)
    assert caldav_read.load("ctag:1", '{"resources": {"/a": 3}}') == (None, None)
