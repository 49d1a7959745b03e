"""The HTTP face's answers, byte for byte (CONTRACT §4), and its routes kept thin.

The routes return what their response models describe and raise their refusals; one set of
handlers (worker/faces/web/problems.py) writes every problem+json. These tests pin the bytes a
caller reads, so that the models and the handlers cannot change them unnoticed.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.conftest import apply_settings
from worker.faces.web import bookings, feeds, webhooks
from worker.faces.web.app import create_app
from worker.jobs import booking
from worker.jobs.feeds import registry
from worker.store import get_engine, tokens

START, END = "2099-12-01T09:00:00Z", "2099-12-01T09:45:00.123Z"


@pytest.fixture
def web(configured: str) -> Iterator[TestClient]:
    with TestClient(create_app()) as client:
        yield client


@pytest.fixture
def auth(configured: str) -> dict[str, str]:
    with get_engine(configured).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    return {"Authorization": f"Bearer {tokens.create('tests')}"}


def as_written(value: Any) -> bytes:
    """JSON as the service has always written it (Starlette's JSONResponse: json.dumps)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def test_a_view_over_http_is_the_jobs_view_as_json_writes_it(web: TestClient, auth: dict[str, str]) -> None:
    # Numbers in metadata that pydantic's JSON writer would spell otherwise (1e-7), an instant with
    # milliseconds (a datetime field would write microseconds), text beyond ASCII.
    metadata = {"tiny": 1e-07, "big": 1e100, "text": "é\u2028", "n": 12345678901234567890}
    put = web.put("/v1/bookings/b-1", json={"start": START, "end": END, "metadata": metadata}, headers=auth)
    assert put.status_code == 201, put.text
    view = booking.get_meeting("b-1")
    assert put.content == as_written(view)
    assert web.get("/v1/bookings/b-1", headers=auth).content == as_written(view)
    assert web.get("/v1/bookings", headers=auth).content == as_written({"results": [view], "cursor": None})
    again = web.put("/v1/bookings/b-1", json={"start": START, "end": END}, headers=auth)
    assert again.status_code == 200 and again.content == as_written(booking.get_meeting("b-1"))


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "answer"),
    [
        (
            "GET",
            "/v1/bookings/no; body: x",
            {},
            404,
            {
                "type": "about:blank",
                "title": "Not Found",
                "status": 404,
                "detail": "booking_id: no meeting with booking_id 'no; body: x'",
                "errors": [{"field": "booking_id", "rule": "no meeting with booking_id 'no; body: x'"}],
            },
        ),
        (
            "PUT",
            "/v1/bookings/b-2",
            {"json": {"start": START, "end": START}},
            422,
            {
                "type": "about:blank",
                "title": "Invalid request",
                "status": 422,
                "detail": "end: must be after start",
                "errors": [{"field": "end", "rule": "must be after start"}],
            },
        ),
        (
            "GET",
            "/v1/bookings",
            {"params": {"cursor": "garbage"}},
            422,
            {
                "type": "about:blank",
                "title": "Invalid request",
                "status": 422,
                "detail": "cursor: is not a cursor this service gave out",
                "errors": [{"field": "cursor", "rule": "is not a cursor this service gave out"}],
            },
        ),
        (
            "PUT",
            "/v1/bookings/b-2",
            {"content": b"{}", "headers": {"Content-Length": "99999999999"}},
            413,
            {
                "type": "about:blank",
                "title": "Payload Too Large",
                "status": 413,
                "detail": f"the body is larger than {bookings.MAX_BODY} bytes",
            },
        ),
        (
            "GET",
            "/v1/feeds/nope",
            {},
            404,
            {
                "type": "about:blank",
                "title": "Not found",
                "status": 404,
                "detail": "name: no feed named 'nope'",
            },
        ),
        (
            "POST",
            "/v1/feeds",
            {"json": {"name": "f", "url": 3, "extra": 1}},
            422,
            {
                "type": "about:blank",
                "title": "Invalid request",
                "status": 422,
                "detail": "url: Input should be a valid string; extra: unknown field",
                "errors": [
                    {"field": "url", "rule": "Input should be a valid string"},
                    {"field": "extra", "rule": "unknown field"},
                ],
            },
        ),
    ],
    ids=["unknown booking", "bad body", "bad cursor", "too large", "unknown feed", "bad feed"],
)
def test_refusals_are_problems_byte_for_byte(
    web: TestClient,
    auth: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    answer: dict[str, Any],
) -> None:
    kwargs = dict(kwargs)
    response = web.request(method, path, headers={**auth, **kwargs.pop("headers", {})}, **kwargs)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.content == as_written(answer)


@pytest.mark.parametrize("module", [bookings, feeds, webhooks], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_routes_neither_catch_errors_nor_build_responses(module: Any) -> None:
    # Refusals are raised and answered by problems.install's handlers; answers are the route's
    # response model's. A route that catches, or builds its own JSONResponse, bypasses both.
    tree = ast.parse(inspect.getsource(module))
    routes = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
        and any("router." in ast.unparse(decorator) for decorator in node.decorator_list)
    ]
    assert routes
    for route in routes:
        assert not [node for node in ast.walk(route) if isinstance(node, ast.Try)], route.name
        assert "JSONResponse" not in ast.unparse(route), route.name


def test_a_feed_over_http_is_the_registrys_view(web: TestClient, auth: dict[str, str]) -> None:
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    try:
        new = {"name": "face-1", "url": "http://127.0.0.1:9/a.ics", "room": {"room_mode": "group"}}
        added = web.post("/v1/feeds", json=new, headers=auth)
        assert added.status_code == 201, added.text
        shown = registry.show_feed("face-1")
        assert added.content == as_written({k: v for k, v in shown.items() if k not in DETAIL})
        assert web.get("/v1/feeds/face-1", headers=auth).content == as_written(shown)
        listed = web.get("/v1/feeds", headers=auth).content
        assert listed == as_written({"results": registry.list_feeds()})
        removed = web.delete("/v1/feeds/face-1", headers=auth)
        assert removed.content == as_written({"name": "face-1", "removed": True, "cancelled": 0})
    finally:
        with contextlib.suppress(registry.UnknownFeed):
            registry.remove_feed("face-1")
        apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)


DETAIL = ("limits", "history", "bookings")
