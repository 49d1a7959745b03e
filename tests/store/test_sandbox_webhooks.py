"""The sandbox's people, webhooks and insights, over real HTTP: a SandboxServer sends its webhooks
to a small receiver in this file, which checks each signature the way WHEREBY.md words it."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from worker.devtools.localredis import free_port
from worker.devtools.sandbox import TUNABLE, Sandbox, SandboxAdmin, SandboxConfig, SandboxServer

API_KEY = "test-key-webhooks"
SECRET = "whsec-test-4b1d"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes

    @property
    def event(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.raw)
        return body


@dataclass
class Receiver:
    """Collects raw bodies and headers; answers with `statuses` in turn, then 200."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [item.event for item in self.received]

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.statuses.clear()


def verified(item: Received, secret: str = SECRET, tolerance: float = 300) -> bool:
    """WHEREBY.md: `Whereby-Signature: t=<unix>,v1=<hex>`, v1 = HMAC-SHA256 over "<t>.<raw body>"."""
    parts = dict(part.split("=", 1) for part in item.headers["whereby-signature"].split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + item.raw, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - timestamp) <= tolerance


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.received.append(Received({k.lower(): v for k, v in self.headers.items()}, raw))
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/whereby/webhooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(api_key=API_KEY)) as srv:
        yield srv


@dataclass
class Env:
    server: SandboxServer
    sandbox: Sandbox
    clock: FakeClock
    api: httpx.Client
    admin: SandboxAdmin
    receiver: Receiver

    def room(self, end_in: float = 3600) -> dict[str, Any]:
        end = datetime.fromtimestamp(self.clock.now + end_in, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        response = self.api.post("/meetings", json={"endDate": end})
        assert response.status_code == 201, response.text
        meeting: dict[str, Any] = response.json()
        return meeting

    def settle(self) -> list[dict[str, Any]]:
        """Waits until every queued delivery went out; the log then."""
        wait_for(self.admin.webhooks_idle)
        return self.admin.webhook_log()


def wait_for(condition: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def env(server: SandboxServer, receiver: Receiver) -> Iterator[Env]:
    sandbox = server.sandbox
    defaults = replace(sandbox.config)
    clock = FakeClock(float(int(time.time())))  # whole seconds: endDate is written without fractions
    sandbox.clock = clock
    sandbox.reset()
    receiver.clear()
    with (
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5) as api,
        SandboxAdmin(server.admin_url) as admin,
    ):
        admin.set_faults(webhook_url=receiver.url, webhook_secret=SECRET)
        yield Env(server, sandbox, clock, api, admin, receiver)
    for name in TUNABLE:
        setattr(sandbox.config, name, getattr(defaults, name))
    sandbox.reset()
    sandbox.clock = time.time


# ---- events and their signatures -------------------------------------------------------------


def test_joins_and_leaves_send_signed_events_in_whereby_s_envelope(env: Env) -> None:
    room = env.room()
    meeting_id = room["meetingId"]
    host = env.admin.join(meeting_id, role="host", external_id="doctor-7")
    guest = env.admin.join(meeting_id)
    assert {p["participantId"] for p in env.admin.participants(meeting_id)} == {host, guest}
    env.admin.leave(meeting_id, guest)
    env.admin.leave(meeting_id, host)
    wait_for(lambda: len(env.receiver.received) >= 6)
    env.settle()

    for item in env.receiver.received:
        assert item.headers["content-type"] == "application/json"
        assert verified(item)
        assert not verified(item, secret="another-secret")
        assert not verified(Received(item.headers, item.raw.replace(b'"numClients"', b'"numClientz"')))
    events = env.receiver.events()
    assert [e["type"] for e in events] == [
        "room.client.joined",
        "room.client.joined",
        "room.session.started",
        "room.client.left",
        "room.session.ended",
        "room.client.left",
    ]
    clients = [e for e in events if e["type"].startswith("room.client.")]
    assert [e["data"]["numClients"] for e in clients] == [1, 2, 1, 0]
    assert [e["data"]["participantId"] for e in clients] == [host, guest, guest, host]
    assert [e["data"]["roleName"] for e in clients] == ["host", "visitor", "visitor", "host"]
    assert clients[1]["data"]["numClientsByRoleName"] == {"host": 1, "visitor": 1}
    assert clients[3]["data"]["numClientsByRoleName"] == {"host": 0}
    assert clients[0]["data"]["externalId"] == "doctor-7" and clients[1]["data"]["externalId"] is None
    sessions = {e["data"]["roomSessionId"] for e in events}
    assert len(sessions) == 1 and None not in sessions
    for event in events:
        assert set(event) == {"id", "apiVersion", "createdAt", "type", "data"}
        assert event["apiVersion"] == "1.0" and ISO_MS.fullmatch(event["createdAt"])
        data = event["data"]
        assert (data["meetingId"], data["roomName"], data["subdomain"]) == (
            meeting_id,
            room["roomName"],
            "sandbox",
        )
    for event in clients:
        assert event["data"]["metadata"] is None
    stamps = [e["createdAt"] for e in events]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert len({e["id"] for e in events}) == 6
    log = env.admin.webhook_log()
    assert [entry["status"] for entry in log] == [200] * 6
    assert [entry["event_id"] for entry in log] == [e["id"] for e in events]


def test_session_ends_only_after_fewer_than_two_for_the_delay(env: Env) -> None:
    env.admin.set_faults(session_end_delay_seconds=30)
    meeting_id = env.room()["meetingId"]
    first, second = env.admin.join(meeting_id), env.admin.join(meeting_id)
    env.admin.leave(meeting_id, second)
    env.clock.advance(20)
    third = env.admin.join(meeting_id)  # back to two in time: the same session goes on
    env.admin.leave(meeting_id, third)
    env.clock.advance(29)
    time.sleep(0.4)  # the sender's thread looks every 0.1 s
    types = [e["type"] for e in env.receiver.events()]
    assert types.count("room.session.started") == 1 and "room.session.ended" not in types
    env.clock.advance(1)
    wait_for(lambda: "room.session.ended" in [e["type"] for e in env.receiver.events()])
    assert [p["participantId"] for p in env.admin.participants(meeting_id)] == [first]  # one still inside
    env.admin.leave(meeting_id, first)
    env.settle()
    assert [e["type"] for e in env.receiver.events()].count("room.session.ended") == 1


def test_no_webhook_is_configured_nothing_is_sent(env: Env) -> None:
    env.admin.set_faults(webhook_url=None)
    meeting_id = env.room()["meetingId"]
    env.admin.leave(meeting_id, env.admin.join(meeting_id))
    assert env.settle() == [] and env.receiver.received == []
    assert env.admin.rooms()[0]["participants"] == 0


def test_events_stop_one_hour_after_the_end_date(env: Env) -> None:
    meeting_id = env.room(end_in=60)["meetingId"]
    person = env.admin.join(meeting_id)
    env.clock.advance(60 + 3600)
    late = env.admin.join(meeting_id)  # exactly end + 1 h: still sent
    env.clock.advance(1)
    env.admin.leave(meeting_id, person)
    env.admin.leave(meeting_id, late)
    env.admin.join(meeting_id)
    log = env.settle()
    assert [(entry["type"], entry["status"]) for entry in log] == [
        ("room.client.joined", 200),
        ("room.client.joined", 200),
        ("room.session.started", 200),
    ]
    assert len(env.admin.participants(meeting_id)) == 1  # the room itself still works


# ---- delivery faults ---------------------------------------------------------------------------


def test_a_5xx_is_retried_twice_with_the_same_event(env: Env) -> None:
    meeting_id = env.room()["meetingId"]
    env.receiver.statuses.extend([503, 500, 502])
    env.admin.join(meeting_id)
    wait_for(lambda: len(env.admin.webhook_log()) >= 3)
    time.sleep(0.8)  # a fourth attempt would come 0.5 s after the third
    log = env.settle()
    assert [entry["status"] for entry in log] == [503, 500, 502]
    assert [entry["attempt"] for entry in log] == [1, 2, 3]
    assert len({entry["event_id"] for entry in log}) == 1
    raws = {item.raw for item in env.receiver.received}
    assert len(env.receiver.received) == 3 and len(raws) == 1
    assert all(verified(item) for item in env.receiver.received)

    env.receiver.clear()
    env.receiver.statuses.extend([503, 404])
    env.admin.join(env.room()["meetingId"])  # a 4xx is an answer: not retried
    wait_for(lambda: len(env.admin.webhook_log()) >= 5)
    time.sleep(0.8)
    log = env.settle()
    assert [entry["status"] for entry in log[3:]] == [503, 404]


def test_a_receiver_that_does_not_answer_is_tried_three_times(env: Env) -> None:
    env.admin.set_faults(webhook_url=f"http://127.0.0.1:{free_port()}/hooks")
    meeting_id = env.room()["meetingId"]
    env.admin.join(meeting_id)
    wait_for(lambda: len(env.admin.webhook_log()) >= 3)
    time.sleep(0.8)
    log = env.settle()
    assert len(log) == 3 and all(entry["status"] is None and entry["error"] for entry in log)


def test_seeded_drops_duplicates_and_reordering_follow_their_rates(receiver: Receiver) -> None:
    receiver.clear()
    rates = {"webhook_drop_rate": 0.2, "webhook_duplicate_rate": 0.25, "webhook_reorder_rate": 0.2}
    config = SandboxConfig(api_key=API_KEY, seed=11, webhook_url=receiver.url, webhook_secret=SECRET, **rates)
    flags: list[list[tuple[str, bool, bool, bool]]] = []
    with SandboxServer(config) as server, SandboxAdmin(server.admin_url) as admin:
        for _ in range(2):  # a reset replays the same faults, as a fresh sandbox would
            admin.reset()
            receiver.clear()
            end = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
            room = server.sandbox.handle(
                "POST", "/v1/meetings", [], f"Bearer {API_KEY}", json.dumps({"endDate": end}).encode()
            )
            meeting_id = room.body["meetingId"]
            people = [admin.join(meeting_id, role="viewer") for _ in range(100)]
            for person in people:
                admin.leave(meeting_id, person)
            wait_for(admin.webhooks_idle, timeout=20)
            log = admin.webhook_log()
            # Sent in an order that timing decides; which faults were drawn is the seed's alone.
            flags.append(sorted((e["type"], e["dropped"], e["duplicate"], e["reordered"]) for e in log))

            events = 202  # 200 client events, session started and ended
            dropped = [e for e in log if e["dropped"]]
            duplicates = [e for e in log if e["duplicate"]]
            reordered = [e for e in log if e["reordered"] and not e["duplicate"]]
            assert 0.12 * events <= len(dropped) <= 0.28 * events
            sent = events - len(dropped)
            assert 0.15 * sent <= len(duplicates) <= 0.35 * sent
            assert 0.12 * sent <= len(reordered) <= 0.28 * sent
            got = [item.event for item in receiver.received]
            assert len(got) == sent + len(duplicates)
            assert all(verified(item) for item in receiver.received)
            ids = [event["id"] for event in got]
            assert {e["event_id"] for e in duplicates} <= {i for i in ids if ids.count(i) == 2}
            assert not {e["event_id"] for e in dropped} & set(ids)
            stamps = [event["createdAt"] for event in got]
            assert stamps != sorted(stamps)  # held-back events arrived after later ones
    assert flags[0] == flags[1]


# ---- the room's record, insights ----------------------------------------------------------------


def test_deleting_a_room_with_people_inside_removes_them_without_events(env: Env) -> None:
    empty, busy = env.room()["meetingId"], env.room()["meetingId"]
    env.admin.join(busy)
    env.admin.join(busy, role="host")
    assert {r["meeting_id"]: r["participants"] for r in env.admin.rooms()} == {empty: 0, busy: 2}
    env.settle()
    assert env.api.delete(f"/meetings/{busy}").status_code == 204
    assert env.api.delete(f"/meetings/{empty}").status_code == 204
    records = {r["meeting_id"]: r for r in env.admin.rooms()}
    assert records[busy]["deleted_with_participants"] == 2 and records[busy]["participants"] == 0
    assert records[empty]["deleted_with_participants"] == 0
    assert records[busy]["deleted_by"] == "api" and ISO_MS.fullmatch(records[busy]["deleted_at"])
    assert env.admin.participants(busy) == []
    (session,) = env.admin.sessions(busy)
    assert session["endedAt"] is not None
    with pytest.raises(RuntimeError, match="404"):
        env.admin.join(busy)
    with pytest.raises(RuntimeError, match="404"):
        env.admin.join("999999")
    time.sleep(0.3)
    assert [e["type"] for e in env.settle()] == [
        "room.client.joined",
        "room.client.joined",
        "room.session.started",
    ]


def test_insights_tell_an_ongoing_session_from_an_ended_one(env: Env) -> None:
    env.admin.set_faults(insights_points=4, points_per_minute=10)
    room = env.room()
    meeting_id, name = room["meetingId"], room["roomName"]
    first = env.admin.join(meeting_id)
    env.clock.advance(30)
    second = env.admin.join(meeting_id)
    env.clock.advance(60)

    response = env.api.get("/insights/room-sessions", params={"roomName": name})
    assert response.status_code == 200
    (ongoing,) = response.json()["results"]
    assert response.json()["cursor"] is None
    assert ongoing["roomName"] == name and ongoing["endedAt"] is None
    assert ongoing["totalParticipantMinutes"] == 2.5
    env.admin.leave(meeting_id, first)
    env.admin.leave(meeting_id, second)
    env.clock.advance(10)
    env.admin.join(meeting_id)

    response = env.api.get("/insights/room-sessions", params={"roomName": name})
    newest, ended = response.json()["results"]
    assert newest["endedAt"] is None and ended["roomSessionId"] == ongoing["roomSessionId"]
    assert ended["endedAt"] is not None and ended["startedAt"] == ongoing["startedAt"]
    assert ended["totalParticipantMinutes"] == 2.5
    # 4 + 4 spent of 10: a third read does not fit the minute.
    assert env.api.get("/insights/room-sessions", params={"roomName": name}).status_code == 429
    calls = [c for c in env.admin.calls() if c["path"] == "/v1/insights/room-sessions"]
    assert [(c["status"], c["points"], c["room_name"]) for c in calls] == [
        (200, 4, name),
        (200, 4, name),
        (429, 0, name),
    ]

    env.admin.set_faults(points_per_minute=0)
    people = env.api.get("/insights/participants", params={"roomSessionId": ended["roomSessionId"]}).json()
    assert {p["participantId"] for p in people["results"]} == {first, second}
    assert all(p["leftAt"] is not None for p in people["results"])
    missing = env.api.get("/insights/room-sessions")
    assert missing.status_code == 400 and missing.json()["error"].startswith("roomName")
    assert env.api.get("/insights/room-sessions", params={"roomName": "/nowhere"}).json()["results"] == []
    assert httpx.get(f"{env.server.url}/insights/room-sessions", params={"roomName": name}).status_code == 401
    assert env.api.post("/insights/room-sessions").status_code == 405


# ---- settings, reset, shutdown ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"webhook_url": "ftp://example.com/hooks"},
        {"webhook_url": "not a url"},
        {"webhook_secret": ""},
        {"webhook_drop_rate": 1.5},
        {"webhook_duplicate_rate": -0.1},
        {"webhook_reorder_rate": "half"},
        {"session_end_delay_seconds": -1},
        {"insights_points": 0},
    ],
)
def test_webhook_settings_are_checked(env: Env, bad: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError, match=f"400 {next(iter(bad))}:"):
        env.admin.set_faults(latency_ms=12, **bad)
    assert env.sandbox.config.latency_ms == 0  # nothing half applied


def test_the_secret_never_shows_in_the_settings(env: Env) -> None:
    view = env.admin.set_faults(webhook_reorder_rate=0.5)
    assert view["webhook_secret_set"] is True and view["webhook_url"] == env.receiver.url
    assert SECRET not in json.dumps(view) and "webhook_secret" not in view


def test_reset_forgets_people_sessions_and_pending_deliveries(env: Env) -> None:
    env.admin.set_faults(webhook_reorder_rate=1)  # every delivery held back 0.5-1.5 s
    meeting_id = env.room()["meetingId"]
    env.admin.join(meeting_id)
    assert env.admin.webhooks_idle() is False
    env.admin.reset()
    assert env.admin.webhooks_idle() and env.admin.webhook_log() == [] and env.admin.rooms() == []
    time.sleep(1.7)
    assert env.receiver.received == []


def test_server_exit_stops_the_sender(receiver: Receiver) -> None:
    config = SandboxConfig(api_key=API_KEY, webhook_url=receiver.url, webhook_secret=SECRET)
    before = set(threading.enumerate())
    with SandboxServer(config) as server:
        end = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
        reply = server.sandbox.handle(
            "POST", "/v1/meetings", [], f"Bearer {API_KEY}", json.dumps({"endDate": end}).encode()
        )
        server.sandbox.join(reply.body["meetingId"])
        wait_for(lambda: server.sandbox.webhook_log())
        senders = [t for t in set(threading.enumerate()) - before if t.name == "sandbox-webhooks"]
        assert senders
    time.sleep(0.1)
    assert not any(t.is_alive() for t in senders)
