"""Errors as application/problem+json (RFC 9457), with `errors: [{field, rule}]` for bad input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from worker.rules.validation import problems as field_problems

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


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    errors: Sequence[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if errors is not None:
        body["errors"] = [{"field": field, "rule": rule} for field, rule in errors]
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def bad_input(errors: Sequence[tuple[str, str]], status: int = 422) -> JSONResponse:
    detail = "; ".join(f"{field}: {rule}" if field else rule for field, rule in errors)
    return problem(status, "Invalid request", detail, errors)


# What the OpenAPI document says every route may answer with.
RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": "bad input, naming each field"},
}


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
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


__all__ = [
    "MEDIA_TYPE",
    "RESPONSES",
    "FieldProblem",
    "Problem",
    "bad_input",
    "field_problems",
    "install",
    "problem",
]
