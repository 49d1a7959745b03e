"""Bookings over HTTP (CONTRACT §4.2): every route with and without a valid token, the rules and
messages of the Celery tasks over HTTP as problem+json, paging, history; on SQLite and PostgreSQL.
The last tests run the real `roomkeeper web` process with a token made by `roomkeeper tokens`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, text
from sqlmodel import select

from config.settings import get_settings
from tests.conftest import iso, soon
from worker.devtools.harness import BIN, ROOT, ProcessSystem
from worker.devtools.localredis import free_port
from worker.devtools.sandbox import SandboxAdmin, SandboxServer
from worker.faces.web.app import create_app
from worker.rules.validation import InvalidRequest, ScheduleRequest, validate
from worker.store import get_engine, session_scope, tokens
from worker.store.models import History, Meeting, utcnow

PROBLEM = "application/problem+json"


@pytest.fixture
def token(configured: str) -> str:
    with get_engine(configured).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    return tokens.create("tests")


@pytest.fixture
def web(configured: str) -> Iterator[TestClient]:
    with TestClient(create_app()) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(days: float = 1, minutes: float = 45, **extra: Any) -> dict[str, Any]:
    start = soon(days * 86400)
    return {"start": iso(start), "end": iso(start + timedelta(minutes=minutes)), **extra}


def meetings() -> dict[str, str]:
    with session_scope() as session:
        return {m.booking_id: m.state for m in session.execute(select(Meeting)).scalars()}


def history_rows() -> int:
    with session_scope() as session:
        return int(session.execute(select(func.count()).select_from(History)).scalar_one())


def assert_problem(response: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem["status"] == status and problem["title"]
    assert field in [error["field"] for error in problem["errors"]], problem
    return dict(problem)


# --------------------------------------------------------------------------------------------
# Without a valid token: 401, nothing done.

ROUTES = [
    ("PUT", "/v1/bookings/held", body()),
    ("GET", "/v1/bookings/held", None),
    ("DELETE", "/v1/bookings/held", None),
    ("GET", "/v1/bookings", None),
    ("GET", "/v1/bookings/held/history", None),
    ("POST", "/v1/bookings/batch", {"bookings": [{**body(), "booking_id": "batched"}]}),
]


def bad_headers(token: str) -> dict[str, dict[str, str]]:
    tokens.create("revoked")
    revoked = tokens.create("revoked-2")
    tokens.revoke("revoked-2")
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic": {"Authorization": f"Basic {token}"},
        "malformed": auth("not-a-token"),
        "unknown": auth("rk_" + "B" * 43),
        "revoked": auth(revoked),
        "token with a suffix": auth(token + "A"),
    }


@pytest.mark.parametrize(("method", "path", "json_body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_refuses_without_a_valid_token(
    web: TestClient, token: str, method: str, path: str, json_body: Any
) -> None:
    web.put("/v1/bookings/held", json=body(), headers=auth(token))
    before = (meetings(), history_rows())
    for why, headers in bad_headers(token).items():
        response = web.request(method, path, json=json_body, headers=headers)
        assert response.status_code == 401, (why, response.text)
        assert response.headers["content-type"].startswith(PROBLEM), why
        assert response.headers["www-authenticate"] == "Bearer", why
        assert "meeting" not in response.text and "held" not in response.text
    assert (meetings(), history_rows()) == before, "a refused call changed the store"
    assert web.request(method, path, json=json_body, headers=auth(token)).status_code in (200, 201)


# --------------------------------------------------------------------------------------------
# The routes, with a token.


def test_put_books_then_reschedules_get_history_and_delete(web: TestClient, token: str) -> None:
    first = body(metadata={"patient": "p-1"}, room={"room_mode": "group"})
    created = web.put("/v1/bookings/booking-8812", json=first, headers=auth(token))
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["booking_id"] == "booking-8812" and view["state"] == "scheduled"
    assert view["metadata"] == {"patient": "p-1"} and view["room"] is None

    moved = body(days=2, booking_id="booking-8812")  # a body booking_id equal to the path's is fine
    again = web.put("/v1/bookings/booking-8812", json=moved, headers=auth(token))
    assert again.status_code == 200, again.text
    assert again.json()["start"].startswith(moved["start"][:19]) and again.json()["metadata"] == {}

    got = web.get("/v1/bookings/booking-8812", headers=auth(token))
    assert got.status_code == 200 and got.json()["start"] == again.json()["start"]

    history = web.get("/v1/bookings/booking-8812/history", headers=auth(token))
    assert history.status_code == 200
    assert [(h["kind"], h["action"]) for h in history.json()][:2] == [
        ("state", "booked"),
        ("state", "rescheduled"),
    ]
    assert set(history.json()[0]) == {"at", "kind", "action", "outcome"}

    cancelled = web.delete("/v1/bookings/booking-8812", headers=auth(token))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert web.delete("/v1/bookings/booking-8812", headers=auth(token)).status_code == 200  # again: no error
    assert meetings() == {"booking-8812": "cancelled"}


def test_ids_with_slashes_and_odd_characters(web: TestClient, token: str) -> None:
    for booking_id in ("feed:cal:uid/with/slash:2026", "sp ace", "ünï"):
        path = "/v1/bookings/" + httpx.URL("/" + booking_id).raw_path.decode()[1:]
        assert web.put(path, json=body(), headers=auth(token)).status_code == 201
        assert web.get(path, headers=auth(token)).json()["booking_id"] == booking_id
        assert web.get(path + "/history", headers=auth(token)).json()[0]["action"] == "booked"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("suffix", ["", "/history"])
def test_unknown_booking_is_404(web: TestClient, token: str, method: str, suffix: str) -> None:
    if method == "DELETE" and suffix:
        return
    response = web.request(method, f"/v1/bookings/nobody{suffix}", headers=auth(token))
    problem = assert_problem(response, 404, "booking_id")
    assert "nobody" in problem["detail"]
    assert meetings() == {}


def test_list_soonest_first_in_pages(web: TestClient, token: str) -> None:
    start = soon(86400)
    # Two pairs share a start: the id breaks the tie, so no row is lost or repeated at a page edge.
    starts = [start + timedelta(minutes=m) for m in (50, 10, 30, 30, 20, 10, 40)]
    for i, at in enumerate(starts):
        kwargs = {"start": iso(at), "end": iso(at + timedelta(minutes=30))}
        assert web.put(f"/v1/bookings/b{i}", json=kwargs, headers=auth(token)).status_code == 201
    web.delete("/v1/bookings/b6", headers=auth(token))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = web.get("/v1/bookings", params=params, headers=auth(token)).json()
        seen += [v["booking_id"] for v in page["results"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ["b1", "b5", "b4", "b2", "b3", "b6", "b0"]
    only = web.get("/v1/bookings", params={"state": "cancelled"}, headers=auth(token)).json()
    assert [v["booking_id"] for v in only["results"]] == ["b6"] and only["cursor"] is None
    default = web.get("/v1/bookings", headers=auth(token)).json()
    assert len(default["results"]) == 7 and default["cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "sleeping"}, "state"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "WzEsMl0"}, "cursor"),  # base64 of [1,2]: well encoded, not ours
        ({"cursor": "\x00"}, "cursor"),
    ],
)
def test_list_refuses_bad_parameters(web: TestClient, token: str, params: dict[str, Any], field: str) -> None:
    assert_problem(web.get("/v1/bookings", params=params, headers=auth(token)), 422, field)


# --------------------------------------------------------------------------------------------
# Every bad-input rule over HTTP: problem+json naming the field, the Celery task's words, nothing stored.

BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("end before start", body(minutes=-10), "end"),
    ("end in the past", {"start": iso(soon(-7200)), "end": iso(soon(-3600))}, "end"),
    ("start missing", {"end": iso(soon(3600))}, "start"),
    ("start not a date-time", body(start="tomorrow"), "start"),
    ("start a bare date", body(start="2030-01-01"), "start"),
    ("start a number", body(start=5), "start"),
    ("bad room mode", body(room={"room_mode": "party"}), "room.room_mode"),
    ("bad room prefix", body(room={"room_name_prefix": "Has Caps"}), "room.room_name_prefix"),
    ("room prefix too long", body(room={"room_name_prefix": "a" * 40}), "room.room_name_prefix"),
    ("bad room fields", body(room={"fields": ["everything"]}), "room.fields.0"),
    ("unknown room option", body(room={"colour": "red"}), "room.colour"),
    ("room not an object", body(room="big"), "room"),
    ("notify without queue", body(notify={"task": "x"}), "notify.queue"),
    ("metadata too big", body(metadata={"notes": "x" * 5000}), "metadata"),
    ("metadata not an object", body(metadata=[1, 2]), "metadata"),
    ("unknown field", body(colour="red"), "colour"),
    ("NUL in metadata", body(metadata={"a": "b\x00"}), "metadata.a"),
    ("NUL in start", body(start="2030-01-01T10:00:00\x00"), "start"),
    ("other booking_id in the body", body(booking_id="someone-else"), "booking_id"),
]


@pytest.mark.parametrize(("why", "bad", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_put_refuses_bad_input_naming_the_field(
    web: TestClient, token: str, why: str, bad: dict[str, Any], field: str
) -> None:
    response = web.put("/v1/bookings/b-1", json=bad, headers=auth(token))
    problem = assert_problem(response, 422, field)
    assert meetings() == {} and history_rows() == 0, why
    if field != "booking_id":
        # One validation model: the Celery task says exactly the same.
        with pytest.raises(InvalidRequest) as refused:
            validate(
                ScheduleRequest,
                (),
                {**bad, "booking_id": "b-1"},
                caller_prefix_max=get_settings().caller_prefix_max,
                settings=get_settings(),
                now=utcnow(),
            )
        assert problem["detail"] == str(refused.value)


def test_booking_id_too_long_or_unstorable_in_the_path(web: TestClient, token: str) -> None:
    problem = assert_problem(
        web.put("/v1/bookings/" + "x" * 201, json=body(), headers=auth(token)), 422, "booking_id"
    )
    assert "200" in problem["detail"]
    assert_problem(web.put("/v1/bookings/a%00b", json=body(), headers=auth(token)), 422, "booking_id")
    assert_problem(web.get("/v1/bookings/" + "x" * 201, headers=auth(token)), 422, "booking_id")
    assert_problem(web.delete("/v1/bookings/a%00b", headers=auth(token)), 422, "booking_id")
    assert meetings() == {}


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[1, 2]", b'"text"', b"null", b'{"start": NaN}', b"\xff\xfe\x00", b"[" * 5000]
)
def test_bodies_that_are_not_json_objects(web: TestClient, token: str, raw: bytes) -> None:
    headers = {**auth(token), "Content-Type": "application/json"}
    problem = assert_problem(web.put("/v1/bookings/b-1", content=raw, headers=headers), 422, "body")
    assert "JSON object" in problem["detail"]
    assert_problem(web.post("/v1/bookings/batch", content=raw, headers=headers), 422, "body")
    assert meetings() == {}


# --------------------------------------------------------------------------------------------
# Batch over HTTP (worker/jobs/batch.py has the store-level tests).


def test_batch_answers_each_item_in_order(web: TestClient, token: str) -> None:
    web.put("/v1/bookings/existing", json=body(), headers=auth(token))
    items = [
        {**body(), "booking_id": "good-1"},
        {**body(minutes=-5), "booking_id": "bad-end"},
        {**body(days=3), "booking_id": "existing"},
        "not an object",
        {**body(), "booking_id": "good-1"},
        {**body(colour="red"), "booking_id": "bad-field"},
    ]
    response = web.post("/v1/bookings/batch", json={"bookings": items}, headers=auth(token))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["ok"] for r in results] == [True, False, True, False, False, False]
    assert results[0]["created"] is True and results[0]["view"]["booking_id"] == "good-1"
    assert results[2]["created"] is False and results[2]["view"]["start"].startswith(items[2]["start"][:19])
    assert results[1]["errors"] == [{"field": "end", "rule": "must be after start"}]
    assert results[3]["errors"][0]["rule"] == "each booking must be a JSON object"
    assert (
        results[4]["errors"][0]["field"] == "booking_id"
        and "more than once" in results[4]["errors"][0]["rule"]
    )
    assert results[5]["errors"] == [{"field": "colour", "rule": "unknown field"}]
    assert meetings() == {"existing": "scheduled", "good-1": "scheduled"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"bookings": [{}] * 1001}, "bookings"),
        ({"bookings": "all of them"}, "bookings"),
        ({}, "bookings"),
        ({"bookings": [], "extra": 1}, "extra"),
    ],
)
def test_batch_refuses_a_bad_envelope(
    web: TestClient, token: str, payload: dict[str, Any], field: str
) -> None:
    assert_problem(web.post("/v1/bookings/batch", json=payload, headers=auth(token)), 422, field)


def test_openapi_describes_every_route(web: TestClient) -> None:
    spec = web.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    routes = {
        ("put", "/v1/bookings/{booking_id}"),
        ("get", "/v1/bookings/{booking_id}"),
        ("delete", "/v1/bookings/{booking_id}"),
        ("get", "/v1/bookings"),
        ("get", "/v1/bookings/{booking_id}/history"),
        ("post", "/v1/bookings/batch"),
    }
    for method, path in routes:
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"bearer": []}], path
        assert {"401", "422"} <= set(operation["responses"]), path
        assert PROBLEM in operation["responses"]["401"]["content"]
        ok = operation["responses"]["201" if method == "put" else "200"]
        assert ok["content"]["application/json"]["schema"], path
    put = spec["paths"]["/v1/bookings/{booking_id}"]["put"]
    schema = put["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"start", "end"} and "room" in schema["properties"]
    assert "404" in spec["paths"]["/v1/bookings/{booking_id}"]["get"]["responses"]
    assert web.get("/docs").status_code == 200


# --------------------------------------------------------------------------------------------
# The real processes: `roomkeeper tokens create`, `roomkeeper web`, a worker and beat.


class Web:
    def __init__(self, system: ProcessSystem) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(BIN / "roomkeeper"), "web", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=system.env,
            stdout=(system.logs / "web.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        system.wait_for(self._answers, timeout=30)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def cli(system: ProcessSystem, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "roomkeeper"), *args], cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60
    )


def test_the_real_web_process_with_a_token_from_the_cli(
    database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer
) -> None:
    with get_engine(database).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url)
    web = None
    try:
        made = cli(system, "tokens", "create", "curl-user")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        system.start_worker()
        system.start_beat()
        web = Web(system)
        api = httpx.Client(base_url=web.url, headers=auth(token), timeout=10)
        anonymous = httpx.Client(base_url=web.url, timeout=10)

        start = soon(2)
        put = api.put(
            "/v1/bookings/http-1", json={"start": iso(start), "end": iso(start + timedelta(seconds=60))}
        )
        assert put.status_code == 201, put.text
        assert anonymous.get("/v1/bookings/http-1").status_code == 401
        ready = system.wait_for(
            lambda: (v := api.get("/v1/bookings/http-1").json())["state"] == "ready" and v
        )
        assert ready["room"]["room_url"].startswith("http")
        history = api.get("/v1/bookings/http-1/history").json()
        assert any(h["kind"] == "whereby" and h["action"].startswith("POST") for h in history)

        far = soon(86400)
        items = [
            {"booking_id": f"http-b{i}", "start": iso(far), "end": iso(far + timedelta(minutes=30))}
            for i in range(3)
        ] + [{"booking_id": "http-bad", "start": iso(far), "end": iso(far)}]
        results = api.post("/v1/bookings/batch", json={"bookings": items}).json()["results"]
        assert [r["ok"] for r in results] == [True, True, True, False]
        page = api.get("/v1/bookings", params={"limit": 2}).json()
        assert [v["booking_id"] for v in page["results"]] == ["http-1", "http-b0"] and page["cursor"]

        cancelled = api.delete("/v1/bookings/http-1")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        system.wait_for(lambda: not sandbox.rooms(include_deleted=False))

        assert cli(system, "tokens", "revoke", "curl-user").returncode == 0
        refused = api.get("/v1/bookings/http-b0")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert api.delete("/v1/bookings/http-b0").status_code == 401
        assert system.states()["http-b0"] == "scheduled"
        web.stop()
        web = None
        logs = {path.name: path.read_text(errors="replace") for path in system.logs.glob("*.log")}
        assert "web.log" in logs and "/v1/bookings" in logs["web.log"]
        assert not [name for name, text in logs.items() if token in text or token[3:] in text]
    finally:
        if web is not None:
            web.stop()
        system.stop()


def test_a_body_larger_than_any_batch_is_refused(web: TestClient, token: str) -> None:
    huge = b'{"bookings": [' + b" " * (9 * 1024 * 1024) + b"]}"
    headers = {**auth(token), "Content-Type": "application/json"}
    for method, path in (("POST", "/v1/bookings/batch"), ("PUT", "/v1/bookings/b-1")):
        response = web.request(method, path, content=huge, headers=headers)
        assert response.status_code == 413 and response.headers["content-type"].startswith(PROBLEM)
    assert meetings() == {}
