"""A property-based run over the OpenAPI document (schemathesis): whatever a caller sends to the
bookings routes, with a valid token, the answer is never a 5xx; on SQLite and PostgreSQL.

The schema is loaded from the app itself at collection (`schemathesis.pytest.from_fixture` does
not work with pytest 9: it reads a private attribute pytest dropped); the app reads its settings
per request, so the `configured` fixture points it at each test's database."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import text

from worker.faces.web.app import create_app
from worker.store import get_engine, tokens

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/v1/bookings")


@pytest.fixture
def token(configured: str) -> str:
    with get_engine(configured).begin() as connection:
        connection.execute(text("DELETE FROM api_token"))
    return tokens.create("fuzz")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_server_errors(case: schemathesis.Case, token: str) -> None:
    # Sent through FastAPI's TestClient (httpx): schemathesis's own ASGI transport is built on
    # requests, which fails here beside urllib3-future (`TrafficPolice` has no `keys`).
    kwargs = case.as_transport_kwargs(
        base_url="http://testserver", headers={"Authorization": f"Bearer {token}"}
    )
    kwargs.pop("cookies", None)
    data = kwargs.pop("data", None)
    if data is not None:
        kwargs["content"] = data
    with TestClient(app) as client:
        response = client.request(**kwargs)
    case.validate_response(response, checks=[not_a_server_error])
