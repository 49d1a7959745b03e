"""The errors the Whereby client raises, and how an HTTP reply or a transport failure maps to one."""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime

import httpx

from worker.adapters.redact import redact

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "ServerError",
    "WherebyError",
    "connection_error",
    "make_status_error",
]

DEFAULT_RATE_LIMIT_WAIT = 60.0

_ERROR_TEXT_LIMIT = 500


class WherebyError(Exception):
    """Base of every error this client raises.

    `retryable` says whether the same request may succeed later (after a wait the caller
    chooses); it does not mean this client retried it. Messages never contain the API key, nor a
    room key (`roomKey=` in a reply's text is redacted): they end up in logs, `last_error` and
    history lines.

    The rules (worker.rules.lifecycle, which import no adapter) read a failure by its plain
    attributes: `kind` (one of worker.rules.lifecycle's kinds), `retry_after` (seconds to wait,
    for a rate limit, else None) and `request_sent` (whether the request may have reached Whereby).
    """

    retryable: bool = False
    kind: str = "error"
    retry_after: float | None = None
    request_sent: bool = True  # an HTTP reply proves it did

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class APIConnectionError(WherebyError):
    """No HTTP response: the connection failed, broke, or timed out."""

    retryable = True
    kind = "connection"

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message, status_code=None)
        # False only when nothing can have reached Whereby, which is the one case where
        # re-sending a POST cannot create a second room.
        self.request_sent = request_sent


class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool timeout."""


class RateLimitedError(WherebyError):
    """429: the organisation's points budget is spent; try again after `retry_after` seconds."""

    retryable = True
    kind = "rate_limited"
    retry_after: float

    def __init__(self, message: str, *, status_code: int | None = 429, retry_after: float) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class AuthenticationError(WherebyError):
    """401: the API key is missing, wrong or revoked."""

    kind = "authentication"


class PermissionDeniedError(WherebyError):
    """403: the key is valid but the plan does not include the feature."""

    kind = "permission_denied"


class NotFoundError(WherebyError):
    """404: the meeting is unknown or already deleted."""

    kind = "not_found"


class InvalidRequestError(WherebyError):
    """400, 422 and any other 4xx: the request itself is wrong; resending it will not help."""

    kind = "invalid_request"


class ServerError(WherebyError):
    """5xx: Whereby failed; the request may or may not have taken effect."""

    retryable = True
    kind = "server"


def _request_label(response: httpx.Response) -> str:
    try:
        request = response.request
    except RuntimeError:  # a Response built by hand (tests, sandbox) has no request
        return ""
    return f"{request.method} {request.url.path} -> "


def _error_text(response: httpx.Response) -> str:
    # Whereby documents no error shape; observed bodies are {"error": "..."}, so try the
    # usual keys and fall back to the raw text.
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "errors"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else str(value))[:_ERROR_TEXT_LIMIT]
    text = response.text.strip()
    return text[:_ERROR_TEXT_LIMIT] if text else response.reason_phrase


def _retry_after(response: httpx.Response) -> float:
    header = response.headers.get("retry-after")
    if header:
        try:
            seconds = float(header)
        except ValueError:
            # RFC 9110 also allows an HTTP-date.
            try:
                when = email.utils.parsedate_to_datetime(header)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
    try:
        ms_left = response.json()["data"]["msLeft"]
        seconds = float(ms_left) / 1000.0
    except (ValueError, KeyError, TypeError):
        return DEFAULT_RATE_LIMIT_WAIT
    return max(0.0, seconds) if math.isfinite(seconds) else DEFAULT_RATE_LIMIT_WAIT


def make_status_error(response: httpx.Response) -> WherebyError:
    """Map a non-success response to the matching error class."""
    status = response.status_code
    message = f"{_request_label(response)}{status} {response.reason_phrase}: {_error_text(response)}"
    if status == 429:
        return RateLimitedError(message, status_code=status, retry_after=_retry_after(response))
    if status == 401:
        return AuthenticationError(message, status_code=status)
    if status == 403:
        return PermissionDeniedError(message, status_code=status)
    if status == 404:
        return NotFoundError(message, status_code=status)
    if 400 <= status < 500:
        return InvalidRequestError(message, status_code=status)
    if status >= 500:
        return ServerError(message, status_code=status)
    return WherebyError(message, status_code=status)


def connection_error(method: str, path: str, exc: httpx.RequestError) -> APIConnectionError:
    # Only a failed connect proves the request never left; a pool timeout or a broken
    # connection is counted as "maybe sent" so a POST is never repeated on a guess.
    request_sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    message = f"{method} {path}: {type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(message, request_sent=request_sent)
    return APIConnectionError(message, request_sent=request_sent)
