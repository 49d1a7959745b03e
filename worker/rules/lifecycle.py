"""The lifecycle rules as pure functions: when work is due, how long to back off, when to give up.

No clock and no chance: `now` comes in, and the jitter that spreads retries is a pure function of
the inputs (`jitter`). A failed call to Whereby is read through its plain attributes (`FailedCall`),
not its class, so the rules import no adapter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from config.settings import Settings
from worker.rules import retry

# The length of the tag that ties a room to the attempt that made it (worker.store.deployment
# draws the tags and reads them back out of room names).
TAG_LENGTH = 8

# The kinds of failed call (worker.adapters.whereby_errors sets one on each error class).
RATE_LIMITED = "rate_limited"  # 429, or this service's own point budget spent (BudgetExhausted)
AUTHENTICATION = "authentication"  # 401
PERMISSION_DENIED = "permission_denied"  # 403
NOT_FOUND = "not_found"  # 404
INVALID_REQUEST = "invalid_request"  # 400, 422, any other 4xx
SERVER = "server"  # 5xx
CONNECTION = "connection"  # no HTTP reply: refused, broken or timed out


class FailedCall(Protocol):
    """A failed call to Whereby as the rules see it (every worker.adapters.whereby_errors error is one).

    `kind` is one of the kinds above (another value: an error the rules know nothing more of);
    `retry_after` the seconds Whereby asked to wait (rate limits; None otherwise); `request_sent`
    whether the request may have reached Whereby (False only when a connection never opened)."""

    @property
    def kind(self) -> str: ...

    @property
    def retry_after(self) -> float | None: ...

    @property
    def request_sent(self) -> bool: ...


def jitter(*parts: object) -> float:
    """A number in [0, 1) drawn from `parts` alone: the same inputs give the same draw, different
    ones (another attempt, another instant, another key) spread like a random one. The rules use it
    where a retry is jittered, with the attempt number and `now` (to the microsecond) among the
    parts, so workers failing together do not come back together."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _uniform(low: float, high: float, draw: float) -> float:
    return low + (high - low) * draw


def plan(start: datetime, end: datetime, settings: Settings) -> tuple[datetime, datetime]:
    """(when the room is created, the room's endDate and deletion instant)."""
    create_at = start - timedelta(seconds=settings.create_lead_seconds)
    room_end = end + timedelta(seconds=settings.delete_grace_seconds)
    return create_at, room_end


def overrun(settings: Settings) -> timedelta:
    """How long past its end a room with people still inside is kept (CONTRACT §4.3)."""
    return timedelta(seconds=settings.overrun_max_seconds)


def end_date(room_end: datetime, settings: Settings) -> datetime:
    """The Whereby endDate asked for a room deleted at `room_end`: it covers the longest overrun, so
    host rights and webhooks (which stop one hour after endDate) last through it."""
    return room_end + overrun(settings)


# Whereby answers endDate at a coarser precision than asked (milliseconds, or whole seconds).
END_DATE_PRECISION = timedelta(seconds=1)


def covers(room_end_date: datetime, needed_end: datetime) -> bool:
    """Whether a room whose Whereby endDate is `room_end_date` serves a meeting ending at `needed_end`."""
    return needed_end <= room_end_date + END_DATE_PRECISION


# After a 401 every worker stops calling Whereby this long: a bad key is not fixed by retrying.
AUTH_PAUSE_SECONDS = 60


def counts_as_attempt(error: FailedCall) -> bool:
    """Waiting out a rate limit or a bad key is not the meeting's failure."""
    return error.kind not in (RATE_LIMITED, AUTHENTICATION)


@dataclass(frozen=True)
class Retry:
    at: datetime
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


def describe(error: object) -> str:
    name = type(error).__name__
    return f"{name}: {error}" if str(error) else name


def outcome_unknown(error: FailedCall) -> bool:
    """Whether a failed POST may still have made a room (so the next attempt must look it up)."""
    if error.kind == CONNECTION:
        return error.request_sent
    return error.kind == SERVER


# A creation whose meeting starts within this long (or has started) is tried again within
# URGENT_RETRY_SECONDS (jittered) after a transient failure: a streak of 5xx costs seconds, not
# the meeting.
URGENT_WINDOW = timedelta(seconds=10)
URGENT_RETRY_SECONDS = (0.5, 1.5)


def create_retry_delay(
    attempts: int, now: datetime, start: datetime | None, settings: Settings, draw: float
) -> float:
    """Seconds until the next attempt after a transient failure: the exponential backoff, but never
    past the meeting's start. Far from the start the wait is at most half the time left, so
    attempts close in on it; near the start (or past it, the meeting waiting for its room) they
    come every second or so. `draw` (in [0, 1)) is the jitter."""
    delay = retry.backoff(attempts, settings.retry_base_seconds, settings.retry_max_seconds, draw)
    if start is None:
        return delay
    left = (start - now).total_seconds()
    if left <= URGENT_WINDOW.total_seconds():
        return min(delay, _uniform(*URGENT_RETRY_SECONDS, draw))
    return min(delay, _uniform(left / 4, left / 2, draw))


def _paused(error: FailedCall, now: datetime, draw: float) -> datetime | None:
    """When to come back after a rate limit (as told) or a bad key (AUTH_PAUSE_SECONDS); None for
    any other failure."""
    if error.kind == RATE_LIMITED:
        return now + timedelta(seconds=(error.retry_after or 0.0) + draw)
    if error.kind == AUTHENTICATION:
        return now + timedelta(seconds=AUTH_PAUSE_SECONDS + draw)
    return None


def after_create_error(
    error: FailedCall,
    attempts: int,
    now: datetime,
    room_end: datetime,
    settings: Settings,
    start: datetime | None = None,
    *,
    key: str = "",
) -> Retry | GiveUp:
    """What to do after a failed attempt to create a meeting's room. Only a refusal (400, 403) or a
    meeting over without its room gives up: a transient failure is tried again until then. The
    retry is jittered by `jitter(key, attempts, now)`."""
    reason = describe(error)
    if error.kind in (INVALID_REQUEST, PERMISSION_DENIED):
        # Whereby refused this request itself: sending it again cannot succeed.
        return GiveUp(reason)
    draw = jitter(key, attempts, now)
    # A rate limit is not the meeting's fault, and a bad key is the operator's to fix: wait as told,
    # without spending one of its attempts.
    at = _paused(error, now, draw) or now + timedelta(
        seconds=create_retry_delay(attempts, now, start, settings, draw)
    )
    if at >= room_end:
        return GiveUp(f"{reason} (no room could be made before the meeting ended, after {attempts} attempts)")
    return Retry(at, reason)


def after_delete_error(
    error: FailedCall, attempts: int, now: datetime, settings: Settings, *, key: str = ""
) -> datetime:
    """When to try a deletion again. Deletions never give up: a room must not outlive its use. The
    retry is jittered by `jitter(key, attempts, now)`."""
    draw = jitter(key, attempts, now)
    if (paused := _paused(error, now, draw)) is not None:
        return paused
    delay = retry.backoff(attempts, settings.retry_base_seconds, settings.retry_max_seconds, draw)
    return now + timedelta(seconds=delay)


# Whereby removes a room by itself within this long after its endDate.
WHEREBY_SELF_DELETE = timedelta(hours=24)


def expired(room_end_date: datetime, now: datetime) -> bool:
    """Past Whereby's own clean-up there is nothing left to delete."""
    return now > room_end_date + WHEREBY_SELF_DELETE


def fmt(value: datetime | None) -> str | None:
    """An instant as the contract writes it: UTC, ISO-8601, with a Z."""
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds" if value.microsecond else "seconds").replace("+00:00", "Z")
