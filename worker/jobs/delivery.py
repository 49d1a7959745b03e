"""Events POSTed to a caller's notify URL (CONTRACT §4.4): signed, in order per booking, retried.

Each booking's pending deliveries form a chain worked oldest first: only the head is ever tried,
so a later event waits until the earlier one is delivered or given up. One run of the delivery task
works one booking's chain, one POST at a time with short timeouts; a failure puts the head's next
attempt in the store (exponential backoff with jitter, capped so that a receiver that comes back
gets everything within minutes) and the run ends: no worker slot ever sleeps. The retry is sent
with an ETA when it falls before the dispatcher's next tick, else beat's sweep sends it, as for
rooms. After ROOMKEEPER_NOTIFY_RETRY_HOURS an event is given up and recorded as undelivered.

Deliveries take a few of each worker process's slots, and one receiver at most half of those, so
a slow or failing receiver holds up neither room work nor other receivers.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any

import httpx
from sqlalchemy import and_, exists, or_, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from config.settings import Settings, get_settings
from worker.adapters import metrics
from worker.adapters.outbound import OutboundRefused, connect_address, pinned
from worker.adapters.signing import receiver, shown_url, signature
from worker.jobs.dispatch import dispatch_horizon
from worker.runtime import resources
from worker.runtime.app import app
from worker.store import journal, session_scope
from worker.store.models import DeliveryState, EventDelivery, utcnow

log = logging.getLogger(__name__)

TASK = journal.DELIVER_TASK
# One attempt: connecting may take CONNECT_SECONDS, each read or write TIMEOUT_SECONDS, and the
# whole attempt (the address check included) TOTAL_SECONDS, however slowly a receiver answers.
CONNECT_SECONDS = 3.0
TIMEOUT_SECONDS = 10.0
TOTAL_SECONDS = 10.0
# A run's claim on its head outlasts one attempt; a run that died leaves it to beat's sweep after.
CLAIM = timedelta(seconds=30)
# Backoff between attempts: BACKOFF_BASE_SECONDS doubling, capped, each wait drawn in [½, 1] of it.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
# A run hands its chain to a fresh message after this long, so a long chain shares the workers.
RUN_SECONDS = 15.0
# When a run finds no delivery slot free, its message is sent again after about this long.
BUSY_RETRY_SECONDS = 1.0
CLAIM_TOLERANCE = timedelta(seconds=1)  # an ETA message may run a little before due_at on a skewed host

try:
    USER_AGENT = f"roomkeeper/{metadata.version('roomkeeper')}"
except metadata.PackageNotFoundError:  # pragma: no cover - run from a plain checkout
    USER_AGENT = "roomkeeper"


# --------------------------------------------------------------------------------------------
# Per-process state: the HTTP client and the delivery slots.


class _Slots:
    """How many deliveries this process runs at once, in all and per receiver."""

    def __init__(self, total: int) -> None:
        self.lock = threading.Lock()
        self.total = total
        self.per_receiver = max(1, total // 2)
        self.running: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        with self.lock:
            if sum(self.running.values()) >= self.total or self.running.get(key, 0) >= self.per_receiver:
                return False
            self.running[key] = self.running.get(key, 0) + 1
            return True

    def release(self, key: str) -> None:
        with self.lock:
            left = self.running.get(key, 0) - 1
            if left > 0:
                self.running[key] = left
            else:
                self.running.pop(key, None)


# The client and the slots are per process, owned by worker.runtime.resources.


def _reset() -> None:
    # Not closed: another thread may be mid-request on it; it goes with its last reference.
    resources.drop("notify client", "notify slots")


def _new_client() -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(TIMEOUT_SECONDS, connect=CONNECT_SECONDS),
        follow_redirects=False,  # a redirect is a failure: it could lead anywhere
        trust_env=False,  # no proxy from the environment between the check and the receiver
        headers={"User-Agent": USER_AGENT},
    )


def _get_client() -> httpx.Client:
    return resources.own("notify client", _new_client)


def _get_slots(settings: Settings) -> _Slots:
    # A quarter of the pool (at least 2): the rest always stays free for room work.
    return resources.own("notify slots", lambda: _Slots(max(2, settings.worker_concurrency // 4)))


# --------------------------------------------------------------------------------------------
# The rules: backoff and when to give up.


def backoff(attempts: int, rng: random.Random | None = None) -> timedelta:
    """The wait after the `attempts`-th failed attempt: doubling, capped, with jitter."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempts - 1))
    return timedelta(seconds=ceiling * (rng or random).uniform(0.5, 1.0))


def next_attempt(created_at: datetime, attempts: int, now: datetime, settings: Settings) -> datetime | None:
    """When to try again after a failure, or None when the retry window has run out."""
    deadline = created_at + timedelta(hours=settings.notify_retry_hours)
    if now >= deadline:
        return None
    return min(now + backoff(attempts), deadline)


# --------------------------------------------------------------------------------------------
# One attempt.


@dataclass(frozen=True)
class Head:
    """The oldest pending delivery of a booking, as read before it is tried."""

    pk: int
    delivery_id: str
    booking_id: str
    event: str
    url: str
    body: str
    created_at: datetime
    due_at: datetime
    attempts: int
    claim_token: str | None
    claim_until: datetime | None


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status: int | None
    error: str
    elapsed: float


def post(head: Head, settings: Settings) -> Outcome:
    """POST the event once, signed; never raises."""
    started = time.monotonic()

    def failed(error: str, status: int | None = None) -> Outcome:
        return Outcome(False, status, error, time.monotonic() - started)

    secret = settings.notify_signing_secret
    if secret is None:
        return failed("ROOMKEEPER_NOTIFY_SIGNING_SECRET is not set: events are not sent unsigned")
    try:
        # Again before each request: the allow-list may have changed, or the name now points
        # somewhere private. The request then goes to the very address that was checked.
        url, pinned_headers, extensions = pinned(head.url, connect_address(head.url, settings))
    except OutboundRefused as exc:
        return failed(f"refused: {exc}")
    body = head.body.encode()
    headers = {
        "Content-Type": "application/json",
        "Roomkeeper-Event": head.event,
        "Roomkeeper-Delivery": head.delivery_id,
        "Roomkeeper-Signature": signature(secret.get_secret_value(), body, int(time.time())),
        **pinned_headers,
    }
    try:
        # Streamed so the receiver's answer body is never read: only its status counts.
        with _get_client().stream(
            "POST", url, content=body, headers=headers, extensions=extensions
        ) as response:
            status = response.status_code
    except httpx.TimeoutException as exc:
        return failed(f"timed out ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return failed(_describe(exc, head.url, url))
    if 200 <= status < 300:
        return Outcome(True, status, "", time.monotonic() - started)
    if 300 <= status < 400:
        return failed(f"HTTP {status} (redirects are not followed)", status)
    return failed(f"HTTP {status}", status)


class _Attempt:
    """One POST in a thread of its own, so that its caller waits TOTAL_SECONDS at most: httpx's
    timeouts bound each read, not a receiver that drips its answer. An attempt given up on keeps
    its delivery slot until its thread ends, so such a receiver only ever ties up its own share."""

    def __init__(self, head: Head, settings: Settings, release: Callable[[], None]) -> None:
        self.head, self.settings, self.release = head, settings, release
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.outcome: Outcome | None = None
        self.abandoned = False

    def _run(self) -> None:
        try:
            self.outcome = post(self.head, self.settings)
        finally:
            with self.lock:
                self.finished.set()
                late = self.abandoned
            if late:
                self.release()

    def run(self, total: float) -> tuple[Outcome, bool]:
        """The attempt's outcome, and whether its slot is released (False: when its thread ends)."""
        started = time.monotonic()
        threading.Thread(target=self._run, name="notify-post", daemon=True).start()
        self.finished.wait(total)
        with self.lock:
            if not self.finished.is_set():
                self.abandoned = True
                return Outcome(False, None, f"no answer within {total:g}s", time.monotonic() - started), False
        if self.outcome is None:  # post() raised: a bug, not the receiver's doing
            return Outcome(False, None, "internal error", time.monotonic() - started), True
        return self.outcome, True


def _describe(exc: Exception, url: str, sent_to: str) -> str:
    # httpx names the URL in some messages; its query string may hold the receiver's secret.
    message = str(exc).replace(sent_to, shown_url(url)).replace(url, shown_url(url))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --------------------------------------------------------------------------------------------
# A booking's chain.


def _head(booking_id: str) -> Head | None:
    with session_scope() as session:
        row = session.execute(
            select(EventDelivery)
            .where(col(EventDelivery.booking_id) == booking_id, col(EventDelivery.pending).is_(True))
            .order_by(col(EventDelivery.id))
            .limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
        assert row.id is not None
        return Head(
            row.id,
            row.delivery_id,
            row.booking_id,
            row.event,
            row.url,
            row.body,
            row.created_at,
            row.due_at,
            row.attempts,
            row.claim_token,
            row.claim_until,
        )


def _claimable(claim: str | None, now: datetime) -> Any:
    free = or_(col(EventDelivery.claim_until).is_(None), col(EventDelivery.claim_until) < now)
    return or_(free, col(EventDelivery.claim_token) == claim) if claim else free


def _claim(head: Head, claim: str | None, now: datetime) -> str | None:
    """Take the head for one attempt; None when another run has it."""
    token = uuid.uuid4().hex
    with session_scope() as session:
        taken = (
            session.execute(
                update(EventDelivery)
                .where(
                    col(EventDelivery.id) == head.pk,
                    col(EventDelivery.pending).is_(True),
                    _claimable(claim, now),
                )
                .values(claim_token=token, claim_until=now + CLAIM, attempts=col(EventDelivery.attempts) + 1)
                .returning(col(EventDelivery.id))
            ).first()
            is not None
        )
    return token if taken else None


def _finish(
    head: Head, token: str, outcome: Outcome, settings: Settings
) -> tuple[bool, datetime | None, str]:
    """Record the attempt. Returns (the chain may go on, the retry's ETA to send, its claim)."""
    now = utcnow()
    attempts = head.attempts + 1
    mine = and_(col(EventDelivery.id) == head.pk, col(EventDelivery.claim_token) == token)
    shown = shown_url(head.url)
    with session_scope() as session:
        if outcome.delivered:
            done = (
                session.execute(
                    update(EventDelivery)
                    .where(mine)
                    .values(
                        pending=False,
                        state=DeliveryState.DELIVERED,
                        finished_at=now,
                        claim_token=None,
                        claim_until=None,
                        last_status=outcome.status,
                        last_error=None,
                    )
                    .returning(col(EventDelivery.id))
                ).first()
                is not None
            )
            if done:
                _count_after_commit(session, "delivered", (now - head.created_at).total_seconds())
                journal.note(
                    session,
                    head.booking_id,
                    "event",
                    f"delivered {head.event} to {shown}",
                    f"HTTP {outcome.status} in {outcome.elapsed:.3f}s, attempt {attempts}, "
                    f"delivery {head.delivery_id}",
                )
                log.info(
                    "booking %s: delivered %s to %s (HTTP %s, attempt %d)",
                    head.booking_id,
                    head.event,
                    shown,
                    outcome.status,
                    attempts,
                )
            return True, None, ""
        retry_at = next_attempt(head.created_at, attempts, now, settings)
        if retry_at is None:
            given_up = (
                session.execute(
                    update(EventDelivery)
                    .where(mine)
                    .values(
                        pending=False,
                        state=DeliveryState.UNDELIVERED,
                        finished_at=now,
                        claim_token=None,
                        claim_until=None,
                        last_status=outcome.status,
                        last_error=outcome.error,
                    )
                    .returning(col(EventDelivery.id))
                ).first()
                is not None
            )
            if given_up:
                _count_after_commit(session, "undelivered")
                journal.note(
                    session,
                    head.booking_id,
                    "event",
                    f"undelivered {head.event} to {shown}",
                    f"gave up after {attempts} attempts in {settings.notify_retry_hours:g} h, "
                    f"delivery {head.delivery_id}: {outcome.error}",
                )
                log.warning(
                    "booking %s: gave up delivering %s to %s after %d attempts: %s",
                    head.booking_id,
                    head.event,
                    shown,
                    attempts,
                    outcome.error,
                )
            return True, None, ""
        # Sent with an ETA now when it falls before the dispatcher's next tick (its claim then
        # keeps the sweep off it); later retries wait in the store for beat's sweep.
        soon = retry_at <= dispatch_horizon(now, settings)
        retry_claim = uuid.uuid4().hex if soon else None
        retrying = session.execute(
            update(EventDelivery)
            .where(mine)
            .values(
                due_at=retry_at,
                claim_token=retry_claim,
                claim_until=retry_at + CLAIM if soon else None,
                last_status=outcome.status,
                last_error=outcome.error,
            )
            .returning(col(EventDelivery.id))
        ).first()
        if retrying is not None:
            _count_after_commit(session, "retrying")
        log.warning(
            "booking %s: delivering %s to %s failed (attempt %d: %s); next attempt at %s",
            head.booking_id,
            head.event,
            shown,
            attempts,
            outcome.error,
            retry_at.isoformat(timespec="milliseconds"),
        )
        return False, (retry_at if soon else None), retry_claim or ""


def _count_after_commit(session: Any, outcome: str, latency: float | None = None) -> None:
    """Count the attempt for /metrics once its outcome is stored (in Redis: every web process
    serves the same counters, and they stay monotonic when old delivery rows are pruned)."""
    sa_event.listen(
        session, "after_commit", lambda _session: metrics.observe_delivery(outcome, latency), once=True
    )


def send(booking_id: str, claim: str | None = None, eta: datetime | None = None) -> None:
    """Send the delivery task for one booking's chain."""
    app.send_task(
        TASK,
        kwargs={"booking_id": booking_id, "claim": claim},
        queue=get_settings().queue,
        eta=eta,
        ignore_result=True,
    )


def deliver(booking_id: str, claim: str | None = None) -> dict[str, int]:
    """Work one booking's chain: POST its due events in order until one fails or none is left."""
    settings = get_settings()
    slots = _get_slots(settings)
    counts = {"delivered": 0, "undelivered": 0, "retrying": 0}
    started = time.monotonic()
    while True:
        head = _head(booking_id)
        now = utcnow()
        if head is None or head.due_at > now + CLAIM_TOLERANCE:
            return counts  # nothing left, or not due: its own message or beat's sweep will come
        held = head.claim_until is not None and head.claim_until >= now
        if held and not (claim and head.claim_token == claim):
            return counts  # another run works this chain (or holds its retry)
        if time.monotonic() - started > RUN_SECONDS:
            send(booking_id, claim)  # a fresh message, so a long chain takes turns with other work
            return counts
        key = receiver(head.url)
        if not slots.acquire(key):
            # Every delivery slot (or this receiver's share) is taken: try again in a moment,
            # leaving the slot to room work meanwhile.
            delay = BUSY_RETRY_SECONDS * random.uniform(1.0, 2.0)
            send(booking_id, claim, eta=now + timedelta(seconds=delay))
            return counts
        release_now = True
        try:
            token = _claim(head, claim, now)
            if token is None:
                return counts
            claim = None  # spent: the next head of the chain is free
            attempt = _Attempt(head, settings, functools.partial(slots.release, key))
            outcome, release_now = attempt.run(TOTAL_SECONDS)
            goes_on, retry_at, retry_claim = _finish(head, token, outcome, settings)
        finally:
            if release_now:
                slots.release(key)
        if outcome.delivered:
            counts["delivered"] += 1
        elif goes_on:
            counts["undelivered"] += 1
        else:
            counts["retrying"] += 1
            if retry_at is not None:
                send(booking_id, retry_claim, eta=retry_at)
            return counts


def dispatch_due(limit: int = 500) -> int:
    """Beat's sweep: send the chains whose head is due before the next tick and not held.

    Finds retries left to it, and chains whose run died (its claim lapsed)."""
    settings = get_settings()
    now = utcnow()
    horizon = dispatch_horizon(now, settings)
    token = uuid.uuid4().hex
    earlier = aliased(EventDelivery)
    is_head = ~exists().where(
        col(earlier.booking_id) == col(EventDelivery.booking_id),
        col(earlier.pending).is_(True),
        col(earlier.id) < col(EventDelivery.id),
    )
    ready = and_(
        col(EventDelivery.pending).is_(True),
        col(EventDelivery.due_at) <= horizon,
        _claimable(None, now),
    )
    sent = 0
    while True:
        with session_scope() as session:
            picked = list(
                session.execute(
                    select(EventDelivery.id)
                    .where(ready, is_head)
                    .order_by(col(EventDelivery.due_at))
                    .limit(limit)
                ).scalars()
            )
            if not picked:
                break
            rows: Sequence[Any] = session.execute(
                update(EventDelivery)
                .where(col(EventDelivery.id).in_(picked), ready)
                .values(claim_token=token, claim_until=horizon + CLAIM)
                .returning(col(EventDelivery.booking_id), col(EventDelivery.due_at))
            ).all()
        for booking_id, due_at in rows:
            send(booking_id, token, eta=max(due_at, now))
        sent += len(rows)
        if len(picked) < limit:
            break
    if sent:
        log.info("sent %d event delivery chains", sent)
    return sent
