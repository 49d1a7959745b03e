"""The outbox flush: sends the events whose transactions have committed, at least once, in order.

One flush runs at a time per process: a thread that finds one running leaves its events to it, and
the running flush goes round once more, so every commit's events still leave at once. Under load
one flush then sends the events of many creations instead of each creation paying for its own.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, update
from sqlmodel import col, select

from worker.runtime import resources
from worker.runtime.app import app
from worker.store import leases, session_scope
from worker.store.models import Outbox, utcnow

log = logging.getLogger(__name__)

# How long a flush owns the rows it claimed; a flush that died leaves them to the next after this.
CLAIM = timedelta(seconds=60)


class _Flush:
    def __init__(self) -> None:
        self.running = threading.Lock()
        self.wanted = threading.Event()


def _flush() -> _Flush:
    # Per process (worker.runtime.resources): a forked child may have copied the lock while a
    # thread of its parent held it.
    return resources.own("outbox flush", _Flush)


def flush_outbox(limit: int = 500) -> int:
    """Send the events whose transactions have committed; at least once, in order per booking.

    Returns how many events this call sent (0 when another thread's flush takes them over)."""
    flush = _flush()
    sent = 0
    flush.wanted.set()
    while flush.wanted.is_set() and flush.running.acquire(blocking=False):
        # Re-checked after each release: a request that came while the lock was held is served.
        try:
            while flush.wanted.is_set():
                flush.wanted.clear()
                sent += _flush_pass(limit)
        finally:
            flush.running.release()
    return sent


def _flush_pass(limit: int) -> int:
    sent = 0
    while True:
        now = utcnow()
        ready = and_(col(Outbox.pending).is_(True), leases.lapsed(Outbox, now))
        oldest = select(Outbox.id).where(ready).order_by(col(Outbox.id)).limit(limit)
        with session_scope() as session:
            claimed = leases.take(
                session,
                Outbox,
                and_(col(Outbox.id).in_(oldest.scalar_subquery()), col(Outbox.pending).is_(True)),
                leases.lapsed(Outbox, now),
                now + CLAIM,
                returning=(
                    col(Outbox.id),
                    col(Outbox.booking_id),
                    col(Outbox.task),
                    col(Outbox.queue),
                    col(Outbox.kwargs),
                ),
            )
        if not claimed:
            return sent
        rows = sorted(claimed, key=lambda row: row.id)  # RETURNING has no order; events go in id order
        done = []
        for row in rows:
            try:
                # The caller's task, not ours: its result is nobody's to wait on either.
                app.send_task(row.task, kwargs=row.kwargs, queue=row.queue, ignore_result=True)
            except Exception:  # the broker is down: the claim lapses and a later flush retries
                log.exception(
                    "sending event %s for booking %s failed", row.kwargs.get("event"), row.booking_id
                )
                break
            done.append(row.id)
        if done:
            with session_scope() as session:
                session.execute(
                    update(Outbox).where(col(Outbox.id).in_(done)).values(pending=False, sent_at=utcnow())
                )
        sent += len(done)
        if len(done) < len(rows) or len(rows) < limit:
            return sent
