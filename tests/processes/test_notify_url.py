"""Events POSTed to a notify URL (CONTRACT §4.4): a real worker, real HTTP receivers on 127.0.0.1.

Signatures are checked by a verifier written here from the contract's words alone, not with the
service's own signing code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from config.settings import get_settings
from tests.conftest import Events, Ticker, apply_settings, call, iso, soon, wait_for
from worker import store
from worker.adapters.signing import receiver as receiver_key
from worker.devtools.harness import ProcessSystem
from worker.devtools.sandbox import SandboxAdmin, SandboxServer
from worker.jobs import booking, delivery, delivery_chain
from worker.rules import delivery as delivery_rules
from worker.rules.validation import InvalidRequest
from worker.runtime.app import app
from worker.store import journal
from worker.store.models import EventDelivery, utcnow

SECRET = "whsec-test-" + "k" * 24
QUERY_SECRET = "receiver-own-token-93f1"


# --------------------------------------------------------------------------------------------
# The receiver's side, written from CONTRACT §4.4 alone.


def verify(secret: str, header: str, raw_body: bytes, tolerance: float = 300) -> bool:
    """`Roomkeeper-Signature: t=UNIX,v1=HEX`, HEX = HMAC-SHA256 over "{t}.{raw body}"."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields:
        return False
    message = fields["t"].encode() + b"." + raw_body
    expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) <= tolerance


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> str:
        return str(json.loads(self.body)["event"])

    @property
    def delivery(self) -> str:
        return self.headers["roomkeeper-delivery"]


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1; `answer(n)` gives the status of the n-th request (from 0)."""

    answer: Callable[[int], int] = lambda _n: 200
    port: int = 0
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got = Received(time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body, 0)
                receiver.received.append(got)  # on arrival: a test sees a request still being answered
                got.status = receiver.answer(len(receiver.received) - 1)
                self.send_response(got.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/rooms?token={QUERY_SECRET}"

    def delivered(self) -> list[Received]:
        return [r for r in list(self.received) if 200 <= r.status < 300]

    def delivered_events(self, booking_id: str) -> list[str]:
        return [r.event for r in self.delivered() if json.loads(r.body)["booking_id"] == booking_id]


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.stop()


def receiver(receivers: list[Receiver], answer: Callable[[int], int] = lambda _n: 200) -> Receiver:
    made = Receiver(answer).start()
    receivers.append(made)
    return made


@pytest.fixture
def notify_system(system: str) -> Iterator[str]:
    """The running service with a signing secret, 127.0.0.1 allowed, and beat's delivery sweep."""
    with store.get_engine(system).begin() as connection:
        connection.execute(text("DELETE FROM event_delivery"))
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=SECRET, ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    with DeliverySweep(1.0):
        yield system
    apply_settings(
        ROOMKEEPER_NOTIFY_SIGNING_SECRET=None,
        ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None,
        ROOMKEEPER_NOTIFY_RETRY_HOURS=None,
    )


class DeliverySweep(Ticker):
    """Stands in for beat's `deliver-due-events` entry."""

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            app.send_task("rooms.dispatch_deliveries", queue="rooms")


def book(booking_id: str, url: str, start_in: float = 0.3, seconds: float = 2.0, **extra: Any) -> Any:
    start = soon(start_in)
    end = soon(start_in + seconds)
    return call(
        "rooms.schedule_meeting",
        booking_id=booking_id,
        start=iso(start),
        end=iso(end),
        notify={"url": url},
        **extra,
    )


def history(booking_id: str) -> list[tuple[str, str, str]]:
    return [(h.kind, h.action, h.outcome) for h in booking.history(booking_id)]


def deliveries(database: str, booking_id: str) -> list[dict[str, Any]]:
    with store.get_engine(database).begin() as connection:
        rows = connection.execute(
            text(
                "SELECT delivery_id, event, state, attempts, last_error FROM event_delivery "
                "WHERE booking_id = :b ORDER BY id"
            ),
            {"b": booking_id},
        )
        return [dict(row._mapping) for row in rows]


def assert_no_secrets(booking_id: str) -> None:
    for row in history(booking_id):
        text_ = " ".join(row)
        assert QUERY_SECRET not in text_ and SECRET not in text_, row


# --------------------------------------------------------------------------------------------


def test_events_are_signed_posts_in_order_and_recorded_as_delivered(
    notify_system: str, receivers: list[Receiver]
) -> None:
    hook = receiver(receivers)
    view = book("url-signed", hook.url)
    assert view["state"] == "scheduled"
    wait_for(lambda: hook.delivered_events("url-signed") == ["room.ready", "room.deleted"], timeout=20)

    for got in hook.received:
        assert verify(SECRET, got.headers["roomkeeper-signature"], got.body)
        assert not verify("another-secret", got.headers["roomkeeper-signature"], got.body)
        assert not verify(SECRET, got.headers["roomkeeper-signature"], got.body.replace(b"room.", b"rooms"))
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"].startswith("roomkeeper/")
        body = json.loads(got.body)
        assert set(body) == {"event", "booking_id", "meeting", "occurred_at"}
        assert got.headers["roomkeeper-event"] == body["event"]
        assert body["booking_id"] == "url-signed"
        uuid.UUID(got.delivery)
    ready, deleted = hook.received
    assert ready.delivery != deleted.delivery
    assert json.loads(ready.body)["meeting"]["state"] == "ready"
    assert json.loads(ready.body)["meeting"]["room"]["room_url"]
    assert json.loads(deleted.body)["meeting"]["state"] == "ended"

    shown = f"http://127.0.0.1:{hook.port}/hooks/rooms"
    wanted = [f"delivered room.ready to {shown}", f"delivered room.deleted to {shown}"]
    wait_for(lambda: [a for k, a, _ in history("url-signed") if a.startswith("delivered")] == wanted)
    assert [(d["event"], d["state"]) for d in deliveries(notify_system, "url-signed")] == [
        ("room.ready", "delivered"),
        ("room.deleted", "delivered"),
    ]
    assert [d["delivery_id"] for d in deliveries(notify_system, "url-signed")] == [
        ready.delivery,
        deleted.delivery,
    ]
    assert ("event", "room.ready", f"for {shown}, delivery {ready.delivery}") in history("url-signed")
    assert_no_secrets("url-signed")


def test_a_failing_receiver_gets_each_event_again_with_its_delivery_id_then_in_order(
    notify_system: str, receivers: list[Receiver]
) -> None:
    # 500, 502, 503 for the first three requests, then 200.
    hook = receiver(receivers, answer=lambda n: (500, 502, 503)[n] if n < 3 else 200)
    book("url-flaky", hook.url, seconds=1.0)
    wait_for(lambda: hook.delivered_events("url-flaky") == ["room.ready", "room.deleted"], timeout=30)

    statuses = [(r.event, r.status) for r in hook.received]
    # room.deleted was not sent before room.ready had been delivered, though its end came first.
    assert statuses[:4] == [
        ("room.ready", 500),
        ("room.ready", 502),
        ("room.ready", 503),
        ("room.ready", 200),
    ]
    assert statuses[4:] == [("room.deleted", 200)]
    assert len({r.delivery for r in hook.received[:4]}) == 1, "one event, one delivery id, every retry"
    assert all(verify(SECRET, r.headers["roomkeeper-signature"], r.body) for r in hook.received)
    (first, second) = deliveries(notify_system, "url-flaky")
    assert (first["attempts"], second["attempts"]) == (4, 1)
    assert first["delivery_id"] == hook.received[0].delivery


def test_a_receiver_that_times_out_is_tried_again(
    notify_system: str, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "TIMEOUT_SECONDS", 1.0)
    delivery._reset()  # the client is built with the timeout above
    release = threading.Event()

    def answer(n: int) -> int:
        if n == 0:
            release.wait(5)  # far beyond the 1 s timeout
        return 200

    hook = receiver(receivers, answer)
    book("url-timeout", hook.url, seconds=3.0)
    # The first attempt is still held open by the receiver when the second one is answered.
    wait_for(lambda: [r.status for r in hook.received if r.event == "room.ready"][1:2] == [200], timeout=20)
    assert not release.is_set()
    release.set()
    wait_for(lambda: deliveries(notify_system, "url-timeout")[0]["state"] == "delivered", timeout=20)
    (ready, *_rest) = deliveries(notify_system, "url-timeout")
    assert ready["attempts"] >= 2
    assert {r.delivery for r in hook.received if r.event == "room.ready"} == {ready["delivery_id"]}
    wait_for(
        lambda: (
            [(d["event"], d["state"]) for d in deliveries(notify_system, "url-timeout")]
            == [("room.ready", "delivered"), ("room.deleted", "delivered")]
        ),
        timeout=20,
    )
    history_rows = [h for h in history("url-timeout") if h[1].startswith("delivered room.ready")]
    assert len(history_rows) == 1 and "attempt 2" in history_rows[0][2]
    delivery._reset()


def test_a_slow_receiver_holds_up_neither_other_receivers_nor_rooms(
    notify_system: str, receivers: list[Receiver]
) -> None:
    release = threading.Event()

    def slow(_n: int) -> int:
        release.wait(8)  # inside the 10 s timeout: slow, not failing
        return 200

    slow_hook = receiver(receivers, slow)
    fast_hook = receiver(receivers)
    book("url-slow", slow_hook.url, seconds=30)
    wait_for(lambda: len(slow_hook.received) == 1, timeout=10)
    # While the slow receiver holds its request open: another booking's events arrive, in full,
    # and another booking's room is made.
    book("url-fast", fast_hook.url, seconds=1.0)
    call(
        "rooms.schedule_meeting",
        booking_id="url-plain",
        start=iso(soon(0.3)),
        end=iso(soon(30)),
    )
    wait_for(lambda: fast_hook.delivered_events("url-fast") == ["room.ready", "room.deleted"], timeout=15)
    wait_for(lambda: call("rooms.get_meeting", booking_id="url-plain")["state"] == "ready", timeout=10)
    assert not release.is_set() and len(slow_hook.received) == 1
    release.set()
    wait_for(lambda: slow_hook.delivered_events("url-slow") == ["room.ready"], timeout=15)
    call("rooms.cancel_meeting", booking_id="url-slow")
    call("rooms.cancel_meeting", booking_id="url-plain")
    wait_for(lambda: slow_hook.delivered_events("url-slow") == ["room.ready", "room.deleted"], timeout=15)


def test_a_receiver_down_for_a_while_gets_everything_in_order_when_it_comes_back(
    notify_system: str, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_rules, "BACKOFF_MAX_SECONDS", 2.0)  # the cap, scaled down from 5 minutes
    # A port that refuses connections: bound, not listening.
    placeholder = socket.socket()
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    hook = Receiver(port=port)
    book("url-down-1", hook.url, seconds=1.0)
    book("url-down-2", hook.url, seconds=1.5)

    def failed_attempts() -> int:
        return sum(d["attempts"] for b in ("url-down-1", "url-down-2") for d in deliveries(notify_system, b))

    wait_for(lambda: failed_attempts() >= 6, timeout=20)
    stuck = deliveries(notify_system, "url-down-1")
    assert [d["state"] for d in stuck] == ["pending", "pending"]
    assert stuck[0]["last_error"] and "ConnectError" in stuck[0]["last_error"]
    assert stuck[1]["attempts"] == 0, "a later event waits for the earlier one"

    placeholder.close()
    hook.start()
    receivers.append(hook)
    for booking_id in ("url-down-1", "url-down-2"):
        wait_for(lambda b=booking_id: hook.delivered_events(b) == ["room.ready", "room.deleted"], timeout=20)
        stored = deliveries(notify_system, booking_id)
        got = [r for r in hook.received if json.loads(r.body)["booking_id"] == booking_id]
        assert [r.delivery for r in got] == [d["delivery_id"] for d in stored]
        assert all(verify(SECRET, r.headers["roomkeeper-signature"], r.body) for r in got)


def test_an_event_is_recorded_undelivered_after_the_retry_window(
    notify_system: str, receivers: list[Receiver]
) -> None:
    apply_settings(ROOMKEEPER_NOTIFY_RETRY_HOURS="0.001")  # 3.6 s
    hook = receiver(receivers, answer=lambda _n: 503)
    book("url-gone", hook.url, seconds=1.0)
    shown = f"http://127.0.0.1:{hook.port}/hooks/rooms"

    def given_up() -> list[tuple[str, str, str]]:
        return [h for h in history("url-gone") if h[1].startswith("undelivered")]

    rows = wait_for(lambda: len(given_up()) == 2 and given_up(), timeout=30)
    assert [action for _, action, _ in rows] == [
        f"undelivered room.ready to {shown}",
        f"undelivered room.deleted to {shown}",
    ]
    assert all(kind == "event" and "HTTP 503" in outcome for kind, _, outcome in rows)
    assert [d["state"] for d in deliveries(notify_system, "url-gone")] == ["undelivered", "undelivered"]
    assert not [h for h in history("url-gone") if h[1].startswith("delivered")]
    assert_no_secrets("url-gone")
    # The room's own work went on regardless.
    assert call("rooms.get_meeting", booking_id="url-gone")["state"] == "ended"


def test_a_refused_url_stores_nothing_and_names_notify_url(notify_system: str) -> None:
    for url, rule in (
        ("http://10.1.2.3/hook", "must be https"),
        ("https://10.1.2.3/hook", "private, loopback or reserved"),
        ("https://169.254.169.254/latest", "private, loopback or reserved"),
        ("https://[::1]/hook", "private, loopback or reserved"),
        ("https://[::ffff:127.0.0.1]/hook", "private, loopback or reserved"),
        (f"https://user:{QUERY_SECRET}@example.com/hook", "credentials"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            book("url-refused", url)
        assert str(caught.value).startswith("notify.url: ") and rule in str(caught.value)
        assert QUERY_SECRET not in str(caught.value)
    with pytest.raises(InvalidRequest, match="no meeting with booking_id"):
        call("rooms.get_meeting", booking_id="url-refused")
    assert deliveries(notify_system, "url-refused") == []


def test_a_url_notify_needs_the_signing_secret(notify_system: str, receivers: list[Receiver]) -> None:
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None)
    hook = receiver(receivers)
    with pytest.raises(InvalidRequest) as caught:
        book("url-unsigned", hook.url)
    assert str(caught.value).startswith("notify.url: ")
    assert "ROOMKEEPER_NOTIFY_SIGNING_SECRET" in str(caught.value)
    with pytest.raises(InvalidRequest, match="no meeting with booking_id"):
        call("rooms.get_meeting", booking_id="url-unsigned")


def test_a_reschedule_to_a_task_notify_sends_later_events_to_the_task(
    notify_system: str, receivers: list[Receiver], events: Events
) -> None:
    hook = receiver(receivers)
    view = book("url-then-task", hook.url, seconds=30)
    wait_for(lambda: hook.delivered_events("url-then-task") == ["room.ready"], timeout=15)
    call(
        "rooms.schedule_meeting",
        booking_id="url-then-task",
        start=view["start"],
        end=view["end"],
        notify={"task": "bookings.room_event", "queue": events.queue},
    )
    call("rooms.cancel_meeting", booking_id="url-then-task")
    wait_for(lambda: events.names() == ["room.deleted"], timeout=15)
    assert [e["_task"] for e in events.seen] == ["bookings.room_event"]
    assert hook.delivered_events("url-then-task") == ["room.ready"]
    assert [d["event"] for d in deliveries(notify_system, "url-then-task")] == ["room.ready"]


def test_over_http_the_same_rules_and_the_same_delivery(
    notify_system: str, receivers: list[Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from worker.faces.web.app import create_app
    from worker.store import tokens

    caplog.set_level(logging.INFO)
    with store.get_engine(notify_system).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    headers = {"Authorization": f"Bearer {tokens.create('notify-tests')}"}
    hook = receiver(receivers)
    with TestClient(create_app()) as web:
        refused = web.put(
            "/v1/bookings/http-refused",
            headers=headers,
            json={"start": iso(soon(60)), "end": iso(soon(120)), "notify": {"url": "https://10.0.0.1/x"}},
        )
        assert refused.status_code == 422
        (error,) = refused.json()["errors"]
        assert error["field"] == "notify.url"
        with pytest.raises(InvalidRequest) as over_celery:
            book("http-refused", "https://10.0.0.1/x")
        assert str(over_celery.value) == f"notify.url: {error['rule']}", "one model, one message"
        assert web.get("/v1/bookings/http-refused", headers=headers).status_code == 404

        made = web.put(
            "/v1/bookings/http-hook",
            headers=headers,
            json={"start": iso(soon(0.3)), "end": iso(soon(1.5)), "notify": {"url": hook.url}},
        )
        assert made.status_code == 201
        assert QUERY_SECRET not in made.text
        wait_for(lambda: hook.delivered_events("http-hook") == ["room.ready", "room.deleted"], timeout=20)
        assert all(verify(SECRET, r.headers["roomkeeper-signature"], r.body) for r in hook.received)
        shown = f"http://127.0.0.1:{hook.port}/hooks/rooms"

        def delivered_rows() -> list[Any]:
            rows = web.get("/v1/bookings/http-hook/history", headers=headers).json()
            return [row for row in rows if "delivered" in json.dumps(row)]

        rows = wait_for(lambda: len(delivered_rows()) == 2 and delivered_rows(), timeout=10)
        assert all(shown in json.dumps(row) for row in rows)
        history_text = web.get("/v1/bookings/http-hook/history", headers=headers).text
        assert QUERY_SECRET not in history_text and SECRET not in history_text
    # Nothing the service logged holds the receiver's token or the signing secret.
    assert f"delivered room.ready to {shown}" in caplog.text
    assert QUERY_SECRET not in caplog.text and SECRET not in caplog.text


# --------------------------------------------------------------------------------------------
# As deployed: worker and beat processes, retries found by beat's own sweep.


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    with store.get_engine(database).begin() as connection:
        connection.execute(text("DELETE FROM event_delivery"))
    system = ProcessSystem(
        database,
        sandbox_server.url,
        sandbox_server.admin_url,
        {"ROOMKEEPER_NOTIFY_SIGNING_SECRET": SECRET, "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS": "127.0.0.1"},
    )
    try:
        yield system
    finally:
        system.stop()


def test_worker_and_beat_processes_deliver_everything_after_a_receiver_outage(
    procs: ProcessSystem, receivers: list[Receiver]
) -> None:
    procs.start_worker()
    procs.start_beat()
    placeholder = socket.socket()
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind(("127.0.0.1", 0))
    hook = Receiver(port=placeholder.getsockname()[1])
    for n in range(3):
        procs.book(f"proc-hook-{n}", soon(0.5), soon(1.5 + n * 0.5), notify={"url": hook.url})

    def attempts() -> list[int]:
        return [d["attempts"] for n in range(3) for d in deliveries(procs.database_url, f"proc-hook-{n}")]

    # Down long enough that retries fall beyond the dispatcher's next tick: beat's sweep sends them.
    procs.wait_for(lambda: len(attempts()) == 6 and max(attempts()) >= 4, timeout=30)
    placeholder.close()
    hook.start()
    receivers.append(hook)
    for n in range(3):
        procs.wait_for(lambda n=n: hook.delivered_events(f"proc-hook-{n}") == ["room.ready", "room.deleted"])
        # The receiver answers 200 before the worker records it: wait for the record too.
        stored = procs.wait_for(
            lambda n=n: (
                (rows := deliveries(procs.database_url, f"proc-hook-{n}"))
                and all(d["state"] == "delivered" for d in rows)
                and rows
            ),
            timeout=10,
        )
        assert [d["state"] for d in stored] == ["delivered", "delivered"]
        got = [r for r in hook.received if json.loads(r.body)["booking_id"] == f"proc-hook-{n}"]
        assert [r.delivery for r in got] == [d["delivery_id"] for d in stored]
    assert all(verify(SECRET, r.headers["roomkeeper-signature"], r.body) for r in hook.received)
    beat_log = (procs.logs / "beat1.log").read_text()
    assert "event delivery chains" in beat_log, "retries were sent by beat's sweep"
    for name in ("worker1.log", "beat1.log"):
        logged = (procs.logs / name).read_text()
        assert QUERY_SECRET not in logged and SECRET not in logged


def test_with_every_delivery_slot_taken_a_chain_waits_its_turn_without_an_attempt(
    configured: str, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called as a plain function: deliveries never take more than their share of a worker."""
    with store.get_engine(configured).begin() as connection:
        connection.execute(text("DELETE FROM event_delivery"))
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=SECRET, ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    try:
        hook = receiver(receivers)
        with store.session_scope() as session:
            row = journal.delivery_row("busy-1", "room.ready", hook.url, {"event": "room.ready"}, utcnow())
            session.add(EventDelivery(**row))
        sent: list[tuple[str, str | None, Any]] = []
        monkeypatch.setattr(delivery_chain, "send", lambda b, c=None, eta=None: sent.append((b, c, eta)))
        slots = delivery._get_slots(get_settings())
        while slots.acquire(receiver_key(hook.url)):
            pass
        assert delivery.deliver("busy-1") == {"delivered": 0, "undelivered": 0, "retrying": 0}
        ((booking_id, _claim, eta),) = sent
        assert booking_id == "busy-1" and eta is not None and eta > utcnow()
        assert hook.received == [] and deliveries(configured, "busy-1")[0]["attempts"] == 0
        delivery._reset()  # the slots are free again
        assert delivery.deliver("busy-1")["delivered"] == 1
        assert [r.delivery for r in hook.received] == [row["delivery_id"]]
    finally:
        delivery._reset()
        apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None, ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)


def test_an_event_whose_worker_was_killed_mid_post_is_sent_again_with_its_delivery_id(
    procs: ProcessSystem, receivers: list[Receiver], database: str
) -> None:
    if not database.startswith("sqlite"):
        pytest.skip("the same claims as on SQLite; the wait for a lapsed claim is long enough once")
    arrived, hold = threading.Event(), threading.Event()

    def answer(n: int) -> int:
        if n == 0:
            arrived.set()
            hold.wait(20)
            return 500  # whatever it answers, nobody is left to read it
        return 200

    hook = receiver(receivers, answer)
    procs.start_worker()
    procs.start_beat()
    procs.book("proc-crash", soon(0.5), soon(120), notify={"url": hook.url})
    procs.wait_for(arrived.is_set, timeout=20)
    procs.kill_workers()  # SIGKILL while the POST waits for its answer
    hold.set()
    procs.start_worker()
    # Its claim lapses (delivery_chain.CLAIM) and beat's sweep sends the chain to the new worker.
    procs.wait_for(lambda: hook.delivered_events("proc-crash") == ["room.ready"], timeout=90)
    # The receiver answers 200 before the worker records it: wait for the record too.
    procs.wait_for(
        lambda: deliveries(procs.database_url, "proc-crash")[0]["state"] == "delivered", timeout=10
    )
    (stored,) = deliveries(procs.database_url, "proc-crash")
    assert stored["state"] == "delivered" and stored["attempts"] == 2
    assert [r.delivery for r in hook.received] == [stored["delivery_id"]] * 2
    assert all(verify(SECRET, r.headers["roomkeeper-signature"], r.body) for r in hook.received)
