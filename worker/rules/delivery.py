"""What an attempt to deliver an event to a notify URL does to its delivery (CONTRACT §4.4).

A delivery is pending until it is delivered (a 2xx) or given up (undelivered: the retry window,
ROOMKEEPER_NOTIFY_RETRY_HOURS from its event, has run out). Each failure waits a backoff before
the next attempt; a retry due before the dispatcher's next tick is sent at once with an ETA,
a later one waits in the store for beat's sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.rules import retry

# Backoff between attempts: BACKOFF_BASE_SECONDS doubling, capped so that a receiver that comes
# back gets everything within minutes.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
# An ETA message may run a little before due_at on a skewed host.
DUE_TOLERANCE = timedelta(seconds=1)


def backoff(attempts: int, jitter: float) -> timedelta:
    """The wait after the `attempts`-th failed attempt (`jitter` a draw in [0, 1])."""
    return timedelta(seconds=retry.backoff(attempts, BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS, jitter))


def next_attempt(
    created_at: datetime, attempts: int, now: datetime, window: timedelta, jitter: float
) -> datetime | None:
    """When to try again after the `attempts`-th failure, or None when the retry window has run
    out. The last attempt lands on the window's end, not past it."""
    deadline = created_at + window
    if now >= deadline:
        return None
    return min(now + backoff(attempts, jitter), deadline)


@dataclass(frozen=True)
class Delivered:
    """The receiver answered 2xx: the delivery is done, the chain goes on."""


@dataclass(frozen=True)
class Undelivered:
    """The retry window has run out: given up, recorded, the chain goes on."""


@dataclass(frozen=True)
class Retry:
    """Try again at `at`; `send_now`: its message is sent with an ETA now (it falls before the
    dispatcher's next tick), else beat's sweep sends it. The chain waits for it."""

    at: datetime
    send_now: bool


Decision = Delivered | Undelivered | Retry


def after_attempt(
    delivered: bool,
    created_at: datetime,
    attempts: int,
    now: datetime,
    window: timedelta,
    horizon: datetime,
    jitter: float,
) -> Decision:
    """What the `attempts`-th attempt's outcome does to a delivery made at `created_at`."""
    if delivered:
        return Delivered()
    at = next_attempt(created_at, attempts, now, window, jitter)
    if at is None:
        return Undelivered()
    return Retry(at, at <= horizon)


def may_try(
    due_at: datetime,
    claim_token: str | None,
    claim_until: datetime | None,
    claim: str | None,
    now: datetime,
) -> bool:
    """Whether a run that holds `claim` (None: no claim) may try a chain's head now: it is due,
    and no other run holds it (a live claim that is not this run's)."""
    if due_at > now + DUE_TOLERANCE:
        return False  # not due: its own message or beat's sweep will come
    held = claim_until is not None and claim_until >= now
    return not held or (bool(claim) and claim_token == claim)
