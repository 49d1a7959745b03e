"""Whereby's webhooks, sent: signed envelopes POSTed from one background thread, with seeded faults.

Delivery follows WHEREBY.md: `Whereby-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`,
a 5 s timeout, two retries on a 5xx or a connection error (same id and body, a fresh signature).
Faults, drawn from the seeded generator when an event is queued: a dropped event is never sent, a
duplicated one is sent twice, a reordered one is held back 0.5-1.5 s so later events overtake it.
Every attempt lands in the log that /_sandbox/webhooks serves.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from worker.adapters.signing import signature
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.wire import iso_ts

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
RETRIES = 2
RETRY_DELAY_SECONDS = 0.5
REORDER_DELAY_SECONDS = (0.5, 1.5)
# How often the thread asks the sandbox for session ends that came due with no call to notice them.
TICK_SECONDS = 0.1
LOG_LIMIT = 10000


@dataclass
class Delivery:
    event_id: str
    type: str
    meeting_id: str
    body: bytes
    url: str
    secret: str | None
    duplicate: bool = False
    reordered: bool = False
    attempt: int = 1


class WebhookSender:
    """A queue of deliveries ordered by when they are due, and the thread that sends them.

    The Sandbox calls ``submit`` after it lets go of its own lock; ``tick`` is the Sandbox's
    callback for session ends that come due while nothing else happens.
    """

    def __init__(self, config: SandboxConfig, tick: Callable[[], None] | None = None):
        self.config = config
        self._tick = tick
        self._rng = random.Random(config.seed)
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._log: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_created = 0.0
        self._generation = 0
        self._busy = False

    # ---- queueing ----------------------------------------------------------------------------

    def envelope(self, now: float, type_: str, data: dict[str, Any]) -> tuple[str, bytes]:
        """A new event's id and raw body; createdAt never goes backwards, so order is readable."""
        with self._cond:
            created = max(now, self._last_created + 0.001)
            self._last_created = created
        event_id = str(uuid.uuid4())
        body = {
            "id": event_id,
            "apiVersion": "1.0",
            "createdAt": iso_ts(created),
            "type": type_,
            "data": data,
        }
        return event_id, json.dumps(body, separators=(",", ":")).encode()

    def submit(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        with self._cond:
            now = time.monotonic()
            for delivery in deliveries:
                if self._rng.random() < self.config.webhook_drop_rate:
                    self._record(delivery, dropped=True)
                    continue
                delay = 0.0
                if self._rng.random() < self.config.webhook_reorder_rate:
                    delivery.reordered = True
                    delay = self._rng.uniform(*REORDER_DELAY_SECONDS)
                self._push(now + delay, delivery)
                if self._rng.random() < self.config.webhook_duplicate_rate:
                    copy = Delivery(**{**delivery.__dict__, "duplicate": True, "reordered": False})
                    self._push(now + delay + self._rng.uniform(0.01, 0.3), copy)
            self._cond.notify()
        self.ensure_running()

    def _push(self, due: float, delivery: Delivery) -> None:
        heapq.heappush(self._queue, (due, next(self._order), delivery))

    def ensure_running(self) -> None:
        with self._cond:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
            self._thread.start()

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        client = httpx.Client(timeout=TIMEOUT_SECONDS)
        try:
            while True:
                delivery: Delivery | None = None
                with self._cond:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        delivery = heapq.heappop(self._queue)[2]
                        generation = self._generation
                        self._busy = True
                    else:
                        wait = self._queue[0][0] - now if self._queue else TICK_SECONDS
                        self._cond.wait(min(wait, TICK_SECONDS))
                if delivery is None:
                    if self._tick is not None:
                        self._tick()
                    continue
                try:
                    self._send(client, delivery, generation)
                finally:
                    with self._cond:
                        self._busy = False
        finally:
            client.close()

    def _send(self, client: httpx.Client, delivery: Delivery, generation: int) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "whereby-sandbox-webhooks"}
        if delivery.secret:
            headers["Whereby-Signature"] = signature(delivery.secret, delivery.body, int(time.time()))
        status: int | None = None
        failure: str | None = None
        try:
            status = client.post(delivery.url, content=delivery.body, headers=headers).status_code
        except httpx.HTTPError as exc:
            failure = type(exc).__name__
        with self._cond:
            if generation != self._generation:
                return  # reset while it was in flight: forget it
            self._record(delivery, status=status, error=failure)
            if (
                failure is not None or (status is not None and status >= 500)
            ) and delivery.attempt <= RETRIES:
                retry = Delivery(**{**delivery.__dict__, "attempt": delivery.attempt + 1})
                self._push(time.monotonic() + RETRY_DELAY_SECONDS, retry)
                self._cond.notify()
        if failure is not None:
            log.info("webhook %s %s to the receiver failed: %s", delivery.type, delivery.event_id, failure)

    def _record(
        self,
        delivery: Delivery,
        *,
        status: int | None = None,
        error: str | None = None,
        dropped: bool = False,
    ) -> None:
        self._log.append(
            {
                "event_id": delivery.event_id,
                "type": delivery.type,
                "meeting_id": delivery.meeting_id,
                "attempt": delivery.attempt,
                "status": status,
                "error": error,
                "duplicate": delivery.duplicate,
                "dropped": dropped,
                "reordered": delivery.reordered,
                "at": iso_ts(time.time()),
            }
        )
        del self._log[:-LOG_LIMIT]

    # ---- admin -------------------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(entry) for entry in self._log]

    def idle(self) -> bool:
        """True when nothing waits to be sent (tests wait for this before counting)."""
        with self._cond:
            return not self._queue and not self._busy

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self._log.clear()
            self._generation += 1
            # A seeded run after a reset replays the same faults as a fresh sandbox would.
            self._rng = random.Random(self.config.seed)

    def close(self, timeout: float = TIMEOUT_SECONDS + 1) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
