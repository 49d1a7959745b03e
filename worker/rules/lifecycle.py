"""The lifecycle rules as pure functions: when work is due, how long to back off, when to give up."""

from __future__ import annotations

import random
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta

from config.settings import Settings
from worker.adapters import whereby
from worker.rules import retry

_TAG_ALPHABET = string.ascii_lowercase + string.digits
TAG_LENGTH = 8


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


def new_tag() -> str:
    return "".join(secrets.choice(_TAG_ALPHABET) for _ in range(TAG_LENGTH))


# After a 401 every worker stops calling Whereby this long: a bad key is not fixed by retrying.
AUTH_PAUSE_SECONDS = 60


def counts_as_attempt(error: Exception) -> bool:
    """Waiting out a rate limit or a bad key is not the meeting's failure."""
    return not isinstance(error, whereby.RateLimitedError | whereby.AuthenticationError)


@dataclass(frozen=True)
class Retry:
    at: datetime
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


def describe(error: Exception) -> str:
    name = type(error).__name__
    return f"{name}: {error}" if str(error) else name


def outcome_unknown(error: Exception) -> bool:
    """Whether a failed POST may still have made a room (so the next attempt must look it up)."""
    if isinstance(error, whereby.APIConnectionError):
        return error.request_sent
    return isinstance(error, whereby.ServerError)


# A creation whose meeting starts within this long (or has started) is tried again within
# URGENT_RETRY_SECONDS (jittered) after a transient failure: a streak of 5xx costs seconds, not
# the meeting.
URGENT_WINDOW = timedelta(seconds=10)
URGENT_RETRY_SECONDS = (0.5, 1.5)


def create_retry_delay(
    attempts: int, now: datetime, start: datetime | None, settings: Settings, rng: random.Random | None = None
) -> float:
    """Seconds until the next attempt after a transient failure: the exponential backoff, but never
    past the meeting's start. Far from the start the wait is at most half the time left, so
    attempts close in on it; near the start (or past it, the meeting waiting for its room) they
    come every second or so."""
    jitter = (rng or random).random()
    delay = retry.backoff(attempts, settings.retry_base_seconds, settings.retry_max_seconds, jitter)
    if start is None:
        return delay
    left = (start - now).total_seconds()
    if left <= URGENT_WINDOW.total_seconds():
        return min(delay, (rng or random).uniform(*URGENT_RETRY_SECONDS))
    return min(delay, (rng or random).uniform(left / 4, left / 2))


def after_create_error(
    error: Exception,
    attempts: int,
    now: datetime,
    room_end: datetime,
    settings: Settings,
    start: datetime | None = None,
) -> Retry | GiveUp:
    """What to do after a failed attempt to create a meeting's room. Only a refusal (400, 403) or a
    meeting over without its room gives up: a transient failure is tried again until then."""
    reason = describe(error)
    if isinstance(error, whereby.InvalidRequestError | whereby.PermissionDeniedError):
        # Whereby refused this request itself: sending it again cannot succeed.
        return GiveUp(reason)
    if isinstance(error, whereby.RateLimitedError):
        # Not the meeting's fault: wait as told, without spending one of its attempts.
        at = now + timedelta(seconds=error.retry_after + random.uniform(0, 1))
    elif isinstance(error, whereby.AuthenticationError):
        # A bad key is the operator's to fix: wait for it without burning the meeting's attempts.
        at = now + timedelta(seconds=AUTH_PAUSE_SECONDS + random.uniform(0, 1))
    else:
        at = now + timedelta(seconds=create_retry_delay(attempts, now, start, settings))
    if at >= room_end:
        return GiveUp(f"{reason} (no room could be made before the meeting ended, after {attempts} attempts)")
    return Retry(at, reason)


def after_delete_error(error: Exception, attempts: int, now: datetime, settings: Settings) -> datetime:
    """When to try a deletion again. Deletions never give up: a room must not outlive its use."""
    if isinstance(error, whereby.RateLimitedError):
        return now + timedelta(seconds=error.retry_after + random.uniform(0, 1))
    if isinstance(error, whereby.AuthenticationError):
        return now + timedelta(seconds=AUTH_PAUSE_SECONDS + random.uniform(0, 1))
    delay = retry.backoff(attempts, settings.retry_base_seconds, settings.retry_max_seconds, random.random())
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
