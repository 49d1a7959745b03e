"""A caller with one valid token is not root (issue 17): each test plays that caller and asserts the
refusal, and that nothing changed.

1. no environment variable leaves the host (`password_env` is an operator's CLI option only);
2. a calendar bomb is skipped and reported, bounded in size, count and time, in every process;
3. every outbound request keeps to the rules (redirects, checked address, no proxy, deadline, ports)
   and fails without telling the inside network apart;
4. no Celery task or queue of the caller's choosing;
5. bodies bounded before they are read, and read only after authentication;
6. signature headers of any shape and deep bodies answer 4xx, never 500;
7. password bounds and no password in argv; `/readyz` without error text.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpcore
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlmodel import delete, select
from typer.testing import CliRunner

from tests.conftest import apply_settings, call, iso, wait_for
from tests.store.test_feeds import CalendarServer, base, serving_calendars, stamp, vcalendar, vevent
from worker import store
from worker.adapters.calendars import expand, limits
from worker.faces.cli.main import cli
from worker.faces.web.app import create_app
from worker.jobs import booking
from worker.jobs.feeds import registry, sync
from worker.rules.validation import ScheduleRequest
from worker.runtime.app import app as celery_app
from worker.store import tokens
from worker.store.models import Feed, FeedOccurrence, Meeting

WEBHOOK_SECRET = "whsec_hostile_test"


def minutely_bomb(freq: str = "MINUTELY", since: str = "20160101T090000Z") -> str:
    """The issue's 164-byte calendar: one series every minute (or second) since 2016."""
    return vcalendar(
        "\r\n".join(
            [
                "BEGIN:VEVENT",
                "UID:bomb@x",
                f"DTSTART:{since}",
                f"DTEND:{since[:-4]}500Z",
                f"RRULE:FREQ={freq}",
                "SUMMARY:bomb",
                "END:VEVENT",
            ]
        )
    )


@pytest.fixture
def calendars(configured: str) -> Iterator[CalendarServer]:
    with serving_calendars() as server:
        yield server
    apply_settings(
        ROOMKEEPER_FEED_SYNC_DEADLINE_SECONDS=None,
        ROOMKEEPER_FEED_MAX_COUNT=None,
        ROOMKEEPER_HTTP_NOTIFY_TASKS=None,
        ROOMKEEPER_SECRET_KEY=None,
        ROOMKEEPER_NOTIFY_SIGNING_SECRET=None,
    )


@pytest.fixture
def web(calendars: CalendarServer) -> Iterator[TestClient]:
    with TestClient(create_app()) as client:
        yield client


@pytest.fixture
def auth(calendars: CalendarServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.create('hostile-' + uuid.uuid4().hex[:12])}"}


def feeds_stored() -> int:
    with store.session_scope() as session:
        return len(list(session.execute(select(Feed)).scalars()))


def in_time(seconds: float, work: Any) -> Any:
    """`work()`'s result, failing the test (not hanging it) when it takes longer than `seconds`."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(work)
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        raise AssertionError(f"did not finish within {seconds} s") from None
    finally:
        pool.shutdown(wait=False)


# --------------------------------------------------------------------------------------------
# 1. Environment variables stay on the host.


def test_password_env_is_refused_over_http(web: TestClient, auth: dict[str, str]) -> None:
    os.environ["RK_HOSTILE_SECRET"] = "the-service-secret"
    try:
        answer = web.post(
            "/v1/feeds",
            json={
                "name": "steal",
                "url": "http://127.0.0.1:9/cal/",
                "username": "me",
                "password_env": "RK_HOSTILE_SECRET",
            },
            headers=auth,
        )
    finally:
        os.environ.pop("RK_HOSTILE_SECRET")
    assert answer.status_code == 422, answer.text
    assert [e["field"] for e in answer.json()["errors"]] == ["password_env"]
    assert feeds_stored() == 0


def test_a_password_over_http_is_stored_encrypted_and_bounded(web: TestClient, auth: dict[str, str]) -> None:
    apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
    feed = {"name": "dav", "url": "http://127.0.0.1:9/cal/", "username": "me"}
    too_long = web.post("/v1/feeds", json={**feed, "password": "p" * 1025}, headers=auth)
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["field"] == "password"
    assert feeds_stored() == 0
    made = web.post("/v1/feeds", json={**feed, "password": "s3cret-pass"}, headers=auth)
    assert made.status_code == 201 and made.json()["password"] == "stored encrypted"
    assert "s3cret-pass" not in made.text
    with store.session_scope() as session:
        row = session.execute(select(Feed)).scalar_one()
        assert row.password_enc and "s3cret-pass" not in row.password_enc and row.password_env is None


def test_the_status_does_not_tell_whether_a_variable_is_set(calendars: CalendarServer) -> None:
    url = calendars.url + "/dav/"
    registry.add_feed(registry.FeedSpec(name="op", url=url, username="u", password_env="RK_SURELY_UNSET_VAR"))
    result = sync.sync_feed("op")
    assert result["last_outcome"] == "failed"
    # The operator named the variable (the view shows that name); the status tells nothing of it.
    shown = registry.show_feed("op")
    status = json.dumps([shown["last_detail"], shown["history"]])
    assert "RK_SURELY_UNSET_VAR" not in status and "not set" not in status and "environment" not in status


def test_the_cli_takes_no_password_in_argv(calendars: CalendarServer) -> None:
    apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
    runner = CliRunner()
    url = calendars.url + "/dav/"
    in_argv = runner.invoke(cli, ["feeds", "add", "a", url, "--username", "u", "--password", "hunter2"])
    assert in_argv.exit_code != 0 and feeds_stored() == 0
    from_stdin = runner.invoke(
        cli, ["feeds", "add", "b", url, "--username", "u", "--password"], input="hunter2\n"
    )
    assert from_stdin.exit_code == 0, from_stdin.output
    with store.session_scope() as session:
        row = session.execute(select(Feed)).scalar_one()
        assert row.password_enc is not None
    assert registry.password_of(row.password_enc) == "hunter2"


# --------------------------------------------------------------------------------------------
# 2. Calendar bombs.


@pytest.mark.parametrize("freq", ["MINUTELY", "SECONDLY"])
def test_a_minutely_series_since_2016_is_skipped_and_reported_at_once(
    calendars: CalendarServer, freq: str
) -> None:
    url = calendars.put("/bomb.ics", minutely_bomb(freq))
    registry.add_feed(registry.FeedSpec(name="bomb", url=url, horizon_days=366))
    started = time.monotonic()
    result = in_time(30, lambda: sync.sync_feed("bomb"))
    took = time.monotonic() - started
    print(f"{freq} since 2016, 366-day horizon: synced in {took:.3f} s")
    assert result["last_outcome"] == "ok", result
    assert result["last_changes"]["skipped_series"] == 1 and result["last_changes"]["booked"] == 0
    assert f"FREQ={freq}" in result["last_detail"]
    assert took < 5  # generous for a loaded machine; the figure above is the real one
    shown = registry.show_feed("bomb")
    assert shown["limits"]["max_occurrences_per_series"] == limits.MAX_PER_SERIES
    assert shown["bookings"] == []


def test_occurrences_are_capped_per_series_and_per_feed_the_rest_reported(
    calendars: CalendarServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_PER_SERIES", 5)
    monkeypatch.setattr(limits, "MAX_PER_FEED", 8)
    t = base()
    hourly = vevent("hourly@x", t, minutes=10, extra="RRULE:FREQ=HOURLY;COUNT=30")
    daily = [
        vevent(f"d{i}@x", t + timedelta(minutes=20 + i), extra="RRULE:FREQ=DAILY;COUNT=3") for i in range(2)
    ]
    url = calendars.put("/many.ics", vcalendar(hourly, *daily))
    registry.add_feed(registry.FeedSpec(name="many", url=url, horizon_days=7))
    result = sync.sync_feed("many")
    assert result["last_outcome"] == "ok", result
    changes = result["last_changes"]
    # 30 hourly: 5 kept, 25 skipped; 5 + 3 + 3 = 11 left for the feed: 8 booked, 3 skipped.
    assert changes["booked"] == 8 and changes["skipped_occurrences"] == 28, changes
    assert "the soonest 5 booked" in result["last_detail"] and "more than 8" in result["last_detail"]
    assert len(registry.show_feed("many")["bookings"]) == 8


def test_an_hourly_series_from_long_ago_is_expanded_from_the_horizon_not_from_its_start() -> None:
    now = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    old = expand.parse(minutely_bomb("HOURLY", since="19900101T090000Z"))
    recent = expand.parse(minutely_bomb("HOURLY", since="20260301T090000Z"))
    started = time.monotonic()
    found = expand.expand(old, "f", now, now + timedelta(days=2)).found
    took = time.monotonic() - started
    print(f"HOURLY since 1990, 2-day window: expanded in {took:.3f} s")
    assert {(o.start, o.end) for o in found.values()} == {
        (o.start, o.end) for o in expand.expand(recent, "f", now, now + timedelta(days=2)).found.values()
    }
    assert len(found) == 49
    # The series was moved up to just before the horizon: it no longer starts in 1990.
    assert old.walk("VEVENT")[0]["DTSTART"].dt > now - timedelta(days=5)


def test_a_series_that_cannot_be_moved_up_and_would_step_through_years_is_skipped() -> None:
    now = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    text = minutely_bomb("DAILY;BYHOUR=9,10;COUNT=1000000", since="19000101T090000Z")
    expansion = expand.expand(expand.parse(text), "f", now, now + timedelta(days=2))
    assert expansion.found == {} and expansion.skipped_series == 1
    assert "before the horizon" in expansion.notes[0]


def test_bodies_and_feeds_are_bounded(
    web: TestClient, auth: dict[str, str], calendars: CalendarServer
) -> None:
    t = base()
    padding = "X-PAD:" + "p" * 70 + "\r\n"
    big = vcalendar(vevent("big@x", t, extra=padding * (limits.MAX_BODY_BYTES // len(padding) + 10)))
    url = calendars.put("/big.ics", big)
    registry.add_feed(registry.FeedSpec(name="big", url=url))
    result = sync.sync_feed("big")
    assert result["last_outcome"] == "failed" and "larger than" in result["last_detail"]
    assert registry.show_feed("big")["bookings"] == []

    apply_settings(ROOMKEEPER_FEED_MAX_COUNT="2")
    ok = web.post("/v1/feeds", json={"name": "second", "url": calendars.url + "/x.ics"}, headers=auth)
    assert ok.status_code == 201, ok.text
    over = web.post("/v1/feeds", json={"name": "third", "url": calendars.url + "/x.ics"}, headers=auth)
    assert over.status_code == 409 and "ROOMKEEPER_FEED_MAX_COUNT" in over.text
    assert feeds_stored() == 2


class DrippingServer:
    """Answers 200 text/calendar, then sends its body a few bytes at a time, forever (each read well
    inside any read timeout, the whole never ending)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/calendar")
                self.end_headers()
                try:
                    self.wfile.write(b"BEGIN:VCALENDAR\r\n")
                    while not server.stop.wait(0.1):
                        self.wfile.write(b"X-A:b\r\n")
                        self.wfile.flush()
                except OSError:
                    pass

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/drip.ics"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()


def test_a_sync_has_a_hard_deadline_in_the_worker_and_in_the_web_process(
    calendars: CalendarServer, web: TestClient, auth: dict[str, str]
) -> None:
    t = base()
    calendars.put("/cal.ics", vcalendar(vevent("kept@x", t)))
    registry.add_feed(registry.FeedSpec(name="slow", url=calendars.url + "/cal.ics"))
    assert sync.sync_feed("slow")["last_changes"]["booked"] == 1
    held = registry.show_feed("slow")["bookings"]
    drip = DrippingServer()
    try:
        with store.session_scope() as session:
            session.execute(select(Feed).where(Feed.name == "slow")).scalar_one().url = drip.url
        apply_settings(ROOMKEEPER_FEED_SYNC_DEADLINE_SECONDS="1")
        for run in (
            lambda: sync.sync_feed("slow"),
            lambda: web.post("/v1/feeds/slow/sync", headers=auth).json(),
        ):
            started = time.monotonic()
            result = in_time(15, run)
            took = time.monotonic() - started
            print(f"a dripping feed, 1 s deadline: gave up after {took:.2f} s")
            assert result["last_outcome"] == "failed", result
            assert took < 4
            assert registry.show_feed("slow")["bookings"] == held  # nothing changed
            assert booking.get_meeting(f"feed:slow:kept@x:{stamp(t)}")["state"] == "scheduled"
    finally:
        drip.close()


# --------------------------------------------------------------------------------------------
# 3. Outbound rules for every request.


class Recorder:
    """An HTTP server that records every request it gets and answers with a fixed response."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.seen: list[tuple[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.seen.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_REPORT = do_PROPFIND = do_POST = do_CONNECT = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_caldav_follows_no_redirect_past_the_rules(calendars: CalendarServer) -> None:
    # Only 127.0.0.1 is allowed; the calendar redirects to `localhost`, another name for the host.
    inside = Recorder(207, {"Content-Type": "application/xml"}, b"<multistatus xmlns='DAV:'/>")
    hop = Recorder(301, {"Location": f"http://localhost:{inside.port}/private/"})
    try:
        registry.add_feed(registry.FeedSpec(name="dav", url=f"http://127.0.0.1:{hop.port}/cal/", caldav=True))
        result = sync.sync_feed("dav")
        assert result["last_outcome"] == "failed" and "outbound rules" in result["last_detail"]
        assert hop.seen and inside.seen == []
    finally:
        inside.close()
        hop.close()


def test_proxy_variables_are_ignored_by_every_feed_request(
    calendars: CalendarServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Recorder(502)
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", "")
        monkeypatch.setenv("no_proxy", "")
        t = base()
        url = calendars.put("/p.ics", vcalendar(vevent("p@x", t)))
        registry.add_feed(registry.FeedSpec(name="ics", url=url))
        registry.add_feed(registry.FeedSpec(name="dav", url=calendars.url + "/dav/", caldav=True))
        assert sync.sync_feed("ics")["last_outcome"] == "ok"
        sync.sync_feed("dav")  # the calendar server does not speak CalDAV: fails, but not via the proxy
        assert proxy.seen == []
    finally:
        proxy.close()


def test_a_feed_connects_to_the_address_it_checked(
    calendars: CalendarServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_feed(registry.FeedSpec(name="rebind", url="https://1.1.1.1/cal.ics"))
    with store.session_scope() as session:
        session.execute(
            select(Feed).where(Feed.name == "rebind")
        ).scalar_one().url = "https://calendar.example.com/cal.ics"
    answers = iter(["1.1.1.1", "127.0.0.1", "127.0.0.1", "127.0.0.1"])  # public when checked, then not

    def getaddrinfo(host: str, *_: Any, **__: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), 0))]

    connected: list[str] = []

    def connect_tcp(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        connected.append(host)
        raise httpcore.ConnectError("no network in the test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    result = sync.sync_feed("rebind")
    assert result["last_outcome"] == "failed"
    assert connected == ["1.1.1.1"]


def test_public_hosts_only_on_allowed_ports_for_feeds_and_notify_urls(
    web: TestClient, auth: dict[str, str]
) -> None:
    feed = web.post("/v1/feeds", json={"name": "ssh", "url": "https://1.1.1.1:22/cal.ics"}, headers=auth)
    assert feed.status_code == 422 and "port 22" in feed.text
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET="s" * 32)
    t = base()
    put = web.put(
        "/v1/bookings/smtp",
        json={
            "start": iso(t),
            "end": iso(t + timedelta(minutes=30)),
            "notify": {"url": "https://1.1.1.1:25/x"},
        },
        headers=auth,
    )
    assert put.status_code == 422 and put.json()["errors"][0]["field"] == "notify.url", put.text
    assert feeds_stored() == 0
    with pytest.raises(booking.UnknownBooking):
        booking.get_meeting("smtp")


def test_a_closed_port_and_a_silent_one_are_told_the_same(calendars: CalendarServer) -> None:
    apply_settings(ROOMKEEPER_FEED_SYNC_DEADLINE_SECONDS="1")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]  # bound, not listening: connections are refused
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)  # accepts, never answers
            silent_port = silent.getsockname()[1]
            for name, port in (("closed", closed_port), ("silent", silent_port)):
                registry.add_feed(registry.FeedSpec(name=name, url=f"http://127.0.0.1:{port}/c.ics"))
            details = {
                in_time(10, lambda n=name: sync.sync_feed(n))["last_detail"] for name in ("closed", "silent")
            }
    assert len(details) == 1, details


# --------------------------------------------------------------------------------------------
# 4. No task or queue of the caller's choosing.


def test_a_notify_task_over_http_is_refused_unless_the_operator_lists_it(
    web: TestClient, auth: dict[str, str], calendars: CalendarServer
) -> None:
    t = base()
    times = {"start": iso(t), "end": iso(t + timedelta(minutes=30))}
    billing = {"task": "otherapp.charge_card", "queue": "billing"}
    put = web.put("/v1/bookings/b-1", json={**times, "notify": billing}, headers=auth)
    assert put.status_code == 422 and [e["field"] for e in put.json()["errors"]] == ["notify.task"]
    batch = web.post(
        "/v1/bookings/batch",
        json={"bookings": [{"booking_id": "b-2", **times, "notify": billing}]},
        headers=auth,
    )
    assert batch.status_code == 200 and batch.json()["results"][0]["errors"][0]["field"] == "notify.task"
    feed = web.post(
        "/v1/feeds", json={"name": "f", "url": calendars.url + "/x.ics", "notify": billing}, headers=auth
    )
    assert feed.status_code == 422 and feed.json()["errors"][0]["field"] == "notify.task"
    with store.session_scope() as session:
        assert list(session.execute(select(Meeting)).scalars()) == []
    assert feeds_stored() == 0

    apply_settings(ROOMKEEPER_HTTP_NOTIFY_TASKS="app.on_room,app.audit@audit")
    ok = web.put(
        "/v1/bookings/b-3", json={**times, "notify": {"task": "app.on_room", "queue": "any"}}, headers=auth
    )
    assert ok.status_code == 201, ok.text
    pinned = {"task": "app.audit", "queue": "billing"}
    wrong_queue = web.put("/v1/bookings/b-4", json={**times, "notify": pinned}, headers=auth)
    assert wrong_queue.status_code == 422
    right_queue = web.put(
        "/v1/bookings/b-5", json={**times, "notify": {**pinned, "queue": "audit"}}, headers=auth
    )
    assert right_queue.status_code == 201


def test_celery_callers_keep_their_notify_task(configured: str) -> None:
    t = base()
    request = ScheduleRequest.model_validate(
        {
            "booking_id": "celery-1",
            "start": iso(t),
            "end": iso(t + timedelta(minutes=30)),
            "notify": {"task": "bookings.room_event", "queue": "bookings"},
        }
    )
    assert booking.schedule_meeting(request)["state"] == "scheduled"


# --------------------------------------------------------------------------------------------
# 5. Bodies bounded before they are read, after authentication.


def asgi_post(path: str, chunks: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """POST `chunks` chunks of 64 KiB straight into the ASGI app: (status, chunks it read)."""
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read >= chunks:
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": read < chunks}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(create_app()(scope, receive, send))
    return status, read


def test_a_huge_webhook_body_is_refused_before_it_is_read(configured: str) -> None:
    apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=WEBHOOK_SECRET)
    try:
        signed = [(b"whereby-signature", f"t={int(time.time())},v1={'a' * 64}".encode())]
        declared = [(b"content-length", str(200 * 1024 * 1024).encode()), *signed]
        assert asgi_post("/whereby/webhooks", 3200, declared) == (413, 0)
        status, read = asgi_post("/whereby/webhooks", 3200, signed)  # chunked: no length given
        assert status == 413 and read <= 2, read
        # Without a signature header, not one byte is read.
        assert asgi_post("/whereby/webhooks", 3200, []) == (401, 0)
    finally:
        apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=None)


def test_the_token_is_checked_before_the_body_is_parsed_or_read(
    calendars: CalendarServer, web: TestClient
) -> None:
    bad_json = web.post("/v1/feeds", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 401, bad_json.text
    assert asgi_post("/v1/feeds", 3200, [(b"content-type", b"application/json")]) == (401, 0)
    token = tokens.create("reader-" + uuid.uuid4().hex[:12])
    status, read = asgi_post("/v1/feeds", 3200, [(b"authorization", f"Bearer {token}".encode())])
    assert status == 413 and read <= 2, read


# --------------------------------------------------------------------------------------------
# 6. Headers of any shape, deep bodies.


def sign(body: bytes, at: int | None = None) -> str:
    stamp_ = str(at if at is not None else int(time.time()))
    digest = hmac.new(WEBHOOK_SECRET.encode(), stamp_.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp_},v1={digest}"


@pytest.mark.parametrize(
    "header",
    [
        "t=" + "9" * 5000 + ",v1=" + "a" * 64,
        "t=1,v1=" + "é" * 64,
        "t=²,v1=" + "a" * 64,
        "t=\uff11\uff12\uff13,v1=" + "a" * 64,
        "t=,v1=",
        "v1=" + "a" * 64,
        "t=1" + ",v1=" + "a" * 64 * 100,
        "\x00\x01",
    ],
)
def test_signature_headers_of_any_shape_are_401_not_500(configured: str, header: str) -> None:
    apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=WEBHOOK_SECRET)
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            answer = client.post(
                "/whereby/webhooks", content=b"{}", headers={"Whereby-Signature": header.encode("utf-8")}
            )
        assert answer.status_code in (400, 401), answer.text
    finally:
        apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=None)


def test_a_correctly_signed_but_very_deep_body_is_4xx(configured: str) -> None:
    apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=WEBHOOK_SECRET)
    try:
        body = b"[" * 30000 + b"]" * 30000
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            answer = client.post("/whereby/webhooks", content=body, headers={"Whereby-Signature": sign(body)})
        assert answer.status_code == 400, answer.text
    finally:
        apply_settings(ROOMKEEPER_WHEREBY_WEBHOOK_SECRET=None)


def test_deep_bodies_to_bookings_and_feeds_are_422(web: TestClient, auth: dict[str, str]) -> None:
    t = base()
    deep: Any = {"leaf": 1}
    for _ in range(200):
        deep = {"d": deep}
    body = {"start": iso(t), "end": iso(t + timedelta(minutes=30)), "metadata": deep}
    put = web.put(
        "/v1/bookings/deep", content=json.dumps(body), headers={**auth, "Content-Type": "application/json"}
    )
    assert put.status_code == 422 and put.json()["errors"][0]["field"] == "body"
    feed = web.post("/v1/feeds", content=b"[" * 5000 + b"]" * 5000, headers=auth)
    assert feed.status_code == 422


# --------------------------------------------------------------------------------------------
# 7. /readyz names what is down, not its error text.


def test_readyz_names_the_dependency_without_its_error_text(
    configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        apply_settings(ROOMKEEPER_DATABASE_URL=f"postgresql://roomkeeper@127.0.0.1:{port}/secretdb")
        try:
            with TestClient(create_app()) as client:
                answer = client.get("/readyz")
        finally:
            apply_settings(ROOMKEEPER_DATABASE_URL=configured)
    assert answer.status_code == 503
    detail = answer.json()["detail"]
    assert detail.startswith("database: ") and "redis" not in detail
    assert "OperationalError" not in detail and str(port) not in detail and "secretdb" not in detail
    assert "OperationalError" in caplog.text  # the reason is in the log, for the operator


# --------------------------------------------------------------------------------------------
# Done when: a bomb synced by a real worker while a normal booking keeps its times.


def test_a_bomb_synced_by_the_worker_leaves_a_normal_booking_on_time(system: str, sandbox: Any) -> None:
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    server = CalendarServer()
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    try:
        url = server.put("/bomb.ics", minutely_bomb())
        registry.add_feed(registry.FeedSpec(name="bomb", url=url, horizon_days=366))
        start = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
        end = start + timedelta(seconds=3)
        sent = time.monotonic()
        syncing = celery_app.send_task("feeds.sync", kwargs={"name": "bomb"}, queue="rooms")
        call("rooms.schedule_meeting", booking_id="normal", start=iso(start), end=iso(end))
        result = syncing.get(timeout=30)
        print(
            f"MINUTELY since 2016, 366-day horizon, in the worker: synced in {time.monotonic() - sent:.3f} s"
        )
        assert result["last_outcome"] == "ok" and result["last_changes"]["skipped_series"] == 1
        ready_at = wait_for(
            lambda: booking.get_meeting("normal")["room"] is not None and datetime.now(UTC), timeout=15
        )
        ended_at = wait_for(
            lambda: booking.get_meeting("normal")["state"] == "ended" and datetime.now(UTC), timeout=20
        )
        print(
            f"normal booking: room ready {(start - ready_at).total_seconds():.2f} s before its start, "
            f"deleted {(ended_at - end).total_seconds():.2f} s after its end"
        )
        assert ready_at <= start + timedelta(seconds=1)
        assert ended_at <= end + timedelta(seconds=3)
    finally:
        server.close()
        apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)
