"""Events POSTed to a caller's notify URL (CONTRACT §4.4): signed, in order per booking, retried.

Each booking's pending deliveries form a chain worked oldest first (`worker/jobs/delivery_chain.py`
keeps it in the store): only the head is ever tried, so a later event waits until the earlier one
is delivered or given up. One run of the delivery task works one booking's chain, one POST at a
time with short timeouts; a failure puts the head's next attempt in the store (the backoff of
`worker/rules/delivery.py`) and the run ends: no worker slot ever sleeps. The retry is sent
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
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata

import httpx

from config.settings import Settings, get_settings
from worker.adapters.outbound import OutboundRefused, connect_address, pinned
from worker.adapters.signing import receiver, shown_url, signature
from worker.jobs import delivery_chain as chain
from worker.jobs.delivery_chain import Head, Outcome
from worker.rules import delivery as rules
from worker.runtime import resources
from worker.store.models import utcnow

log = logging.getLogger(__name__)

# One attempt: connecting may take CONNECT_SECONDS, each read or write TIMEOUT_SECONDS, and the
# whole attempt (the address check included) TOTAL_SECONDS, however slowly a receiver answers.
CONNECT_SECONDS = 3.0
TIMEOUT_SECONDS = 10.0
TOTAL_SECONDS = 10.0
# A run hands its chain to a fresh message after this long, so a long chain shares the workers.
RUN_SECONDS = 15.0
# When a run finds no delivery slot free, its message is sent again after about this long.
BUSY_RETRY_SECONDS = 1.0

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
# One attempt.


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
# A run of a booking's chain.


def deliver(booking_id: str, claim: str | None = None) -> dict[str, int]:
    """Work one booking's chain: POST its due events in order until one fails or none is left."""
    settings = get_settings()
    slots = _get_slots(settings)
    counts = {"delivered": 0, "undelivered": 0, "retrying": 0}
    started = time.monotonic()
    while True:
        head = chain.head(booking_id)
        now = utcnow()
        if head is None or not rules.may_try(head.due_at, head.claim_token, head.claim_until, claim, now):
            # Nothing left; or not due (its own message or beat's sweep will come); or another run
            # works this chain (or holds its retry).
            return counts
        if time.monotonic() - started > RUN_SECONDS:
            chain.send(booking_id, claim)  # a fresh message, so a long chain takes turns with other work
            return counts
        key = receiver(head.url)
        if not slots.acquire(key):
            # Every delivery slot (or this receiver's share) is taken: try again in a moment,
            # leaving the slot to room work meanwhile.
            delay = BUSY_RETRY_SECONDS * random.uniform(1.0, 2.0)
            chain.send(booking_id, claim, eta=now + timedelta(seconds=delay))
            return counts
        release_now = True
        try:
            token = chain.claim(head, claim, now)
            if token is None:
                return counts
            claim = None  # spent: the next head of the chain is free
            attempt = _Attempt(head, settings, functools.partial(slots.release, key))
            outcome, release_now = attempt.run(TOTAL_SECONDS)
            goes_on, retry_at, retry_claim = chain.finish(head, token, outcome, settings)
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
                chain.send(booking_id, retry_claim, eta=retry_at)
            return counts
