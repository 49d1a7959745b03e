"""Typed client for Whereby's REST API: the only code in roomkeeper that talks to Whereby."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from pydantic import (
    ValidationError,
)
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

# The errors live in their own module; they are re-exported here so `whereby.X` keeps naming them.
from worker.adapters.whereby_errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    WherebyError,
    connection_error,
    make_status_error,
)

# The payloads and errors live in modules of their own; they are re-exported here so `whereby.X`
# keeps naming them.
from worker.adapters.whereby_models import (
    CallRecord,
    CreateMeetingRequest,
    Meeting,
    RoomSession,
    _MeetingPage,
    _ModelT,
    _SessionPage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "CallRecord",
    "CreateMeetingRequest",
    "InvalidRequestError",
    "Meeting",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RoomSession",
    "ServerError",
    "WherebyClient",
    "WherebyError",
    "make_status_error",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

# Whereby's budget is in points per organisation per minute; the caller's limiter needs the cost.
POINTS = {"GET": 1, "DELETE": 2, "POST": 3}
# Insights reads are "complex reads" (1 to 10 points, WHEREBY.md); budgeted at the dearer end.
INSIGHTS_POINTS = 5


def _version() -> str:
    try:
        return importlib.metadata.version("roomkeeper")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source checkout that was never pip-installed.
        return "0+unknown"


USER_AGENT = f"roomkeeper/{_version()}"


# --------------------------------------------------------------------------- client


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, APIConnectionError | ServerError)


def _never_sent(exc: BaseException) -> bool:
    return isinstance(exc, APIConnectionError) and not exc.request_sent


def _sleep(seconds: float) -> None:
    # Looked up at call time so tests can replace it without touching time.sleep globally.
    time.sleep(seconds)


def _peek_meeting_id(response: httpx.Response) -> str | None:
    try:
        value = response.json().get("meetingId")
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def _normalise_prefix(prefix: str) -> str:
    # Whereby lower-cases and trims the prefix it stores, and room names start with "/".
    return "/" + prefix.strip().lstrip("/").lower()


class WherebyClient:
    """One `httpx.Client` for Whereby, with typed results and one retry policy.

    Retry policy, declared in `_retrying` and nowhere else:

    - Transport errors and 5xx are retried here, briefly (`max_retries` extra attempts with
      jittered exponential backoff), but only when repeating the request is harmless.
    - GET and DELETE are idempotent, so they get that policy in full.
    - POST /meetings is not: Whereby has no idempotency key, so a POST whose reply was lost
      (read timeout, connection dropped after sending, 5xx) may already have made a room, and
      sending it again would make a second one. `create_meeting` therefore retries only when
      the connection was never established; every other failure goes straight to the caller,
      who must look the room up by its name prefix before creating again.
    - 429, 401, 403, 404 and other 4xx are never retried here. Waiting out a rate limit or an
      outage is the caller's job (it records a next attempt time) so no worker sits asleep.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float | None = None,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 2,
        retry_wait_min: float = 0.2,
        retry_wait_max: float = 2.0,
        before_request: Callable[[str, int], None] | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> None:
        # h11 quotes an illegal header value in its error message, which would leak the key.
        if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError("api_key must be a non-empty string of printable ASCII without spaces")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 <= retry_wait_min <= retry_wait_max:
            raise ValueError("need 0 <= retry_wait_min <= retry_wait_max")
        self.base_url = base_url
        self.max_retries = max_retries
        self.retry_wait_min = retry_wait_min
        self.retry_wait_max = retry_wait_max
        self._before_request = before_request
        self._on_call = on_call
        # The key lives only in the httpx headers (whose repr masks Authorization), never
        # in an attribute of ours that a debugger or repr could print.
        self._http = httpx.Client(
            base_url=base_url,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            transport=transport,
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            },
        )

    def __repr__(self) -> str:
        return f"WherebyClient(base_url={self.base_url!r}, api_key='***')"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- endpoints

    def create_meeting(self, request: CreateMeetingRequest) -> Meeting:
        response = self._request("POST", "/meetings", json=request.to_body(), idempotent=False)
        return self._parse(Meeting, response)

    def get_meeting(self, meeting_id: str, *, fields: Sequence[str] = ()) -> Meeting:
        params: dict[str, str | int] | None = {"fields": ",".join(fields)} if fields else None
        response = self._request("GET", _meeting_path(meeting_id), params=params, meeting_id=meeting_id)
        return self._parse(Meeting, response)

    def list_meetings(
        self,
        *,
        room_name_prefix: str | None = None,
        fields: Sequence[str] = (),
        page_size: int = 100,
    ) -> Iterator[Meeting]:
        if not 1 <= page_size <= 100:
            raise ValueError("page_size must be between 1 and 100")
        prefix = None if room_name_prefix is None else _normalise_prefix(room_name_prefix)
        params: dict[str, str | int] = {"limit": page_size}
        if fields:
            params["fields"] = ",".join(fields)
        if prefix is not None:
            params["roomName[startsWith]"] = prefix
        seen: set[str] = set()
        while True:
            response = self._request("GET", "/meetings", params=params)
            page = self._parse(_MeetingPage, response)
            for meeting in page.results:
                # The filter is only shown in a guide, not the spec: a server that ignores it
                # would otherwise hand us (and the caller's delete loop) every room.
                if prefix is None or (meeting.room_name or "").lower().startswith(prefix):
                    yield meeting
            if page.cursor is None:
                return
            if page.cursor in seen:
                raise WherebyError(f"GET /meetings: cursor {page.cursor!r} repeated; stopping")
            seen.add(page.cursor)
            params["cursor"] = page.cursor

    def delete_meeting(self, meeting_id: str) -> bool:
        """Delete a room; False means it was already gone (Whereby sometimes answers 404)."""
        response = self._request(
            "DELETE",
            _meeting_path(meeting_id),
            meeting_id=meeting_id,
            accept=frozenset({404}),
        )
        return response.status_code != 404

    def room_sessions(self, room_name: str) -> list[RoomSession]:
        """The sessions of one room (insights API; a complex read). One page: the newest matter."""
        response = self._request(
            "GET", "/insights/room-sessions", params={"roomName": room_name}, points=INSIGHTS_POINTS
        )
        return self._parse(_SessionPage, response).results

    # ----------------------------------------------------------------- machinery

    def _retrying(self, *, idempotent: bool) -> Retrying:
        return Retrying(
            retry=retry_if_exception(_is_transient if idempotent else _never_sent),
            stop=stop_after_attempt(self.max_retries + 1),
            # Full jitter: uniform in [min, min * 2**n], capped at max, so workers that failed
            # together do not come back together.
            wait=wait_random_exponential(
                multiplier=self.retry_wait_min * 2,
                min=self.retry_wait_min,
                max=self.retry_wait_max,
            ),
            sleep=lambda seconds: _sleep(seconds),
            reraise=True,
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str | int] | None = None,
        json: dict[str, Any] | None = None,
        meeting_id: str | None = None,
        idempotent: bool = True,
        accept: frozenset[int] = frozenset(),
        points: int | None = None,
    ) -> httpx.Response:
        retrying = self._retrying(idempotent=idempotent)
        cost = POINTS[method] if points is None else points
        return retrying(self._attempt, method, path, params, json, meeting_id, accept, cost)

    def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, str | int] | None,
        json: dict[str, Any] | None,
        meeting_id: str | None,
        accept: frozenset[int],
        points: int,
    ) -> httpx.Response:
        if self._before_request is not None:
            self._before_request(method, points)
        status: int | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            try:
                response = self._http.request(method, path, params=params, json=json)
            except httpx.RequestError as exc:
                raise connection_error(method, path, exc) from exc
            status = response.status_code
            if not (response.is_success or status in accept):
                raise make_status_error(response)
            if meeting_id is None and method == "POST":
                meeting_id = _peek_meeting_id(response)
            return response
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            elapsed = time.monotonic() - started
            logger.debug(
                "whereby %s %s status=%s error=%s elapsed=%.3fs",
                method,
                path,
                status,
                error,
                elapsed,
            )
            self._report(CallRecord(method, path, status, error, elapsed, meeting_id))

    def _report(self, record: CallRecord) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(record)
        except Exception:
            # An audit hook must not turn a created room into an exception: the caller
            # would lose the meeting id and create a second room.
            logger.exception("on_call hook failed for %s %s", record.method, record.path)

    def _parse(self, model: type[_ModelT], response: httpx.Response) -> _ModelT:
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            request = response.request
            raise WherebyError(
                f"{request.method} {request.url.path} -> {response.status_code}: "
                f"unexpected response body ({type(exc).__name__})",
                status_code=response.status_code,
            ) from exc


def _meeting_path(meeting_id: str) -> str:
    if not meeting_id:
        raise ValueError("meeting_id must not be empty")
    # The id is opaque: quote it so it cannot change the path (e.g. "../" or "?").
    return f"/meetings/{quote(meeting_id, safe='')}"
