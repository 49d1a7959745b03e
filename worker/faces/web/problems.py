"""Errors as application/problem+json (RFC 9457), with `errors: [{field, rule}]` for bad input.

The one place the HTTP face turns an error into an answer: routes raise (the domain's own errors,
`InvalidRequest` for bad input, `Refused` for an answer of the face's own), and the handlers that
`install` puts on the app answer. A route has no `try/except` of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from worker.jobs import booking, occupancy
from worker.jobs.feeds import registry
from worker.rules.validation import FieldRule, InvalidRequest, describe

MEDIA_TYPE = "application/problem+json"


class FieldProblem(BaseModel):
    field: str
    rule: str


class Problem(BaseModel):
    """The body of every error answer."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldProblem] | None = None


class Refused(Exception):
    """An answer of the face's own (a body too large, webhooks not configured): raise it, the
    handler answers it."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        errors: Sequence[FieldRule] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.errors, self.headers = errors, headers


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    errors: Sequence[FieldRule] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if errors is not None:
        body["errors"] = [{"field": field, "rule": rule} for field, rule in errors]
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def bad_input(errors: Sequence[FieldRule], status: int = 422) -> JSONResponse:
    return problem(status, "Invalid request", describe(errors), errors)


def _worded(message: str) -> list[FieldRule]:
    # Adapts the jobs that still word their refusals as text (worker/jobs/feeds/registry.py's
    # FeedError: "field: rule; field: rule"): they should raise InvalidRequest with the pairs.
    found: list[FieldRule] = []
    for part in message.split("; "):
        field, _, rule = part.partition(": ")
        found.append((field, rule) if rule else ("", field))
    return found


def _pairs(exc: InvalidRequest) -> list[FieldRule]:
    return list(exc.problems) if exc.problems else _worded(str(exc))


# What the OpenAPI document says every route may answer with.
RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": "bad input, naming each field"},
}


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    return problem(exc.status, exc.title, exc.detail, exc.errors, exc.headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    return bad_input(_pairs(exc))


async def _unknown_booking(request: Request, exc: Exception) -> JSONResponse:
    # The job words it "booking_id: no meeting with booking_id '…'"; the id itself may hold "; ".
    field, _, rule = str(exc).partition(": ")
    errors = list(exc.problems) if isinstance(exc, InvalidRequest) and exc.problems else [(field, rule)]
    return problem(404, "Not Found", str(exc), errors)


async def _feed_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, registry.FeedError)
    if isinstance(exc, registry.UnknownFeed):
        return problem(404, "Not found", str(exc))
    # The job has no error of its own for a name taken: its message says so.
    if isinstance(exc, registry.FeedLimit) or "exists already" in str(exc):
        return problem(409, "Conflict", str(exc), _pairs(exc))
    return bad_input(_pairs(exc))


async def _bad_signature(request: Request, exc: Exception) -> JSONResponse:
    return problem(401, "Unauthorized", str(exc))


async def _bad_event(request: Request, exc: Exception) -> JSONResponse:
    field, _, rule = str(exc).partition(": ")  # worded "field: rule" by worker/jobs/occupancy.py
    return problem(400, "Bad Request", str(exc), [(field, rule)])


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    # What FastAPI itself checks (query and path parameters), named as the models name theirs.
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "path", "query")]
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "is required"
        elif error.get("type") == "extra_forbidden":
            message = "unknown field"
        errors.append((".".join(loc), message))
    return bad_input(errors)


def install(app: FastAPI) -> None:
    """Answer every error the routes raise as problem+json (the most specific class's handler wins)."""
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(booking.UnknownBooking, _unknown_booking)
    app.add_exception_handler(registry.FeedError, _feed_refused)
    app.add_exception_handler(occupancy.BadSignature, _bad_signature)
    app.add_exception_handler(occupancy.BadEvent, _bad_event)


__all__ = [
    "MEDIA_TYPE",
    "RESPONSES",
    "FieldProblem",
    "Problem",
    "Refused",
    "bad_input",
    "install",
    "problem",
]
