"""A booking's chain of notify deliveries in the store: its head, the head's lease, an attempt
recorded as `worker/rules/delivery.py` decides, and beat's sweep of the chains that are due.

Each booking's pending deliveries are worked oldest first: only the head is ever tried, so a later
event waits until the earlier one is delivered or given up. `worker/jobs/delivery.py` runs a chain.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_
from sqlalchemy import event as sa_event
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from config.settings import Settings, get_settings
from worker.adapters import metrics
from worker.adapters.signing import shown_url
from worker.jobs.dispatch import dispatch_horizon
from worker.rules import delivery as rules
from worker.runtime.app import app
from worker.store import journal, leases, session_scope
from worker.store.models import DeliveryState, EventDelivery, utcnow

log = logging.getLogger(__name__)

TASK = journal.DELIVER_TASK
# A run's claim on its head outlasts one attempt; a run that died leaves it to beat's sweep after.
CLAIM = timedelta(seconds=30)


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


def head(booking_id: str) -> Head | None:
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


def claim(head: Head, held: str | None, now: datetime) -> str | None:
    """Lease the head for one attempt (counted now); None when another run has it. `held`: the
    claim this run's message carries, which may take the head over."""
    token = leases.new_token()
    free = leases.lapsed(EventDelivery, now)
    if held:
        free = or_(free, leases.held_by(EventDelivery, held))
    with session_scope() as session:
        taken = leases.take(
            session,
            EventDelivery,
            and_(col(EventDelivery.id) == head.pk, col(EventDelivery.pending).is_(True)),
            free,
            now + CLAIM,
            token=token,
            values={"attempts": col(EventDelivery.attempts) + 1},
        )
    return token if taken else None


def finish(head: Head, token: str, outcome: Outcome, settings: Settings) -> tuple[bool, datetime | None, str]:
    """Record the attempt. Returns (the chain may go on, the retry's ETA to send, its claim)."""
    now = utcnow()
    attempts = head.attempts + 1
    shown = shown_url(head.url)
    decision = rules.after_attempt(
        outcome.delivered,
        head.created_at,
        attempts,
        now,
        timedelta(hours=settings.notify_retry_hours),
        dispatch_horizon(now, settings),
        random.random(),
    )
    with session_scope() as session:
        if not isinstance(decision, rules.Retry):
            state = DeliveryState.DELIVERED if outcome.delivered else DeliveryState.UNDELIVERED
            ended = leases.release(
                session,
                EventDelivery,
                head.pk,
                token,
                pending=False,
                state=state,
                finished_at=now,
                last_status=outcome.status,
                last_error=None if outcome.delivered else outcome.error,
            )
            if ended and outcome.delivered:
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
            elif ended:
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
        retry_claim = leases.new_token() if decision.send_now else None
        retrying = leases.release(
            session,
            EventDelivery,
            head.pk,
            token,
            due_at=decision.at,
            claim_token=retry_claim,
            claim_until=decision.at + CLAIM if decision.send_now else None,
            last_status=outcome.status,
            last_error=outcome.error,
        )
        if retrying:
            _count_after_commit(session, "retrying")
        log.warning(
            "booking %s: delivering %s to %s failed (attempt %d: %s); next attempt at %s",
            head.booking_id,
            head.event,
            shown,
            attempts,
            outcome.error,
            decision.at.isoformat(timespec="milliseconds"),
        )
        return False, (decision.at if decision.send_now else None), retry_claim or ""


def _count_after_commit(session: Session, outcome: str, latency: float | None = None) -> None:
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


def dispatch_due(limit: int = 500) -> int:
    """Beat's sweep: send the chains whose head is due before the next tick and not held.

    Finds retries left to it, and chains whose run died (its claim lapsed)."""
    settings = get_settings()
    now = utcnow()
    horizon = dispatch_horizon(now, settings)
    token = leases.new_token()
    earlier = aliased(EventDelivery)
    is_head = ~exists().where(
        col(earlier.booking_id) == col(EventDelivery.booking_id),
        col(earlier.pending).is_(True),
        col(earlier.id) < col(EventDelivery.id),
    )
    due = and_(col(EventDelivery.pending).is_(True), col(EventDelivery.due_at) <= horizon)
    free = leases.lapsed(EventDelivery, now)
    sent = 0
    while True:
        with session_scope() as session:
            picked = list(
                session.execute(
                    select(EventDelivery.id)
                    .where(due, free, is_head)
                    .order_by(col(EventDelivery.due_at))
                    .limit(limit)
                ).scalars()
            )
            if not picked:
                break
            rows: Sequence[Any] = leases.take(
                session,
                EventDelivery,
                and_(col(EventDelivery.id).in_(picked), due),
                free,
                horizon + CLAIM,
                token=token,
                returning=(col(EventDelivery.booking_id), col(EventDelivery.due_at)),
            )
        for booking_id, due_at in rows:
            send(booking_id, token, eta=max(due_at, now))
        sent += len(rows)
        if len(picked) < limit:
            break
    if sent:
        log.info("sent %d event delivery chains", sent)
    return sent
