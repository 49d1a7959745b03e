"""Retention: finished bookings and long-delivered events pruned from the store, a small batch at a time.

What goes (ROOMKEEPER_RETENTION_DAYS, default 90; ROOMKEEPER_DELIVERED_RETENTION_DAYS, default 30):

- A meeting that is over (ended, cancelled or failed) and whose end is more than the retention
  days ago, with everything recorded about it: its rooms, its history, its outbox and event
  delivery rows (undelivered ones included) and Whereby's webhook events for its rooms. A meeting
  with anything still in flight (a room pending or live, an event not yet sent or delivered) stays.
- Sent outbox rows and delivered event_delivery rows, after the delivered-retention days, whatever
  their booking's state: they hold a copy of the meeting view each, and nothing reads them again.
- Event deliveries given up on whose booking is no longer stored (a feed's events), and Whereby's
  webhook events applied long ago for rooms the store does not hold (other services' rooms), after
  the retention days.

The booking id of a pruned meeting is free again: sent again, it is a new booking.

How (Oban's pruner is the model): beat runs `prune` every ROOMKEEPER_PRUNE_INTERVAL_SECONDS. Each
batch is one short transaction (BATCH_MEETINGS meetings with their rows, or BATCH_ROWS rows), found
by a range scan of an index (migration 0008), and the next batch waits at least as long as the last
one took: pruning holds the store's write lock (SQLite has one writer) at most half the time, a
batch at a time, so a room deletion due meanwhile waits one batch at most. Each batch's figures go
to /metrics at once, so a long first run shows its progress.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select
from sqlmodel import Session, col

from config.settings import Settings, get_settings
from worker import store
from worker.adapters import metrics
from worker.store import session_scope
from worker.store.models import (
    DeliveryState,
    EventDelivery,
    History,
    Meeting,
    MeetingState,
    Outbox,
    Room,
    RoomState,
    WebhookEvent,
    utcnow,
)

log = logging.getLogger(__name__)

FINAL = (MeetingState.ENDED, MeetingState.CANCELLED, MeetingState.FAILED)
TABLES = ("meeting", "room", "history", "outbox", "event_delivery", "webhook_event")
BATCH_MEETINGS = 100  # a meeting brings its rooms, history (a dozen lines or so) and events along
BATCH_ROWS = 500
PAUSE_SECONDS = 0.05  # the least wait between two batches; a slow batch waits as long as it took


@dataclass(frozen=True)
class Cutoffs:
    """Rows older than these go; None keeps them (the setting is 0)."""

    bookings: datetime | None
    delivered: datetime | None


def cutoffs(now: datetime, settings: Settings) -> Cutoffs:
    def before(days: int) -> datetime | None:
        return now - timedelta(days=days) if days > 0 else None

    return Cutoffs(before(settings.retention_days), before(settings.delivered_retention_days))


# --------------------------------------------------------------------------------------------
# What may go, as WHERE clauses: the one definition both the prune and the dry run use.


def _prunable(cutoff: datetime, state: str | None = None) -> ColumnElement[bool]:
    """A meeting that is over, ended before the cutoff, with nothing of it still in flight."""
    in_flight = or_(
        exists().where(
            col(Room.meeting_pk) == col(Meeting.id),
            col(Room.state).in_((RoomState.PENDING, RoomState.LIVE)),
        ),
        exists().where(col(Outbox.booking_id) == col(Meeting.booking_id), col(Outbox.pending).is_(True)),
        exists().where(
            col(EventDelivery.booking_id) == col(Meeting.booking_id), col(EventDelivery.pending).is_(True)
        ),
    )
    # One state at a time in the prune: each is then a range scan of (state, end).
    states = col(Meeting.state) == state if state else col(Meeting.state).in_(FINAL)
    return and_(states, col(Meeting.end) < cutoff, ~in_flight)


def _old_sent_outbox(cut: Cutoffs) -> ColumnElement[bool] | None:
    if cut.delivered is None:
        return None
    return and_(col(Outbox.sent_at) < cut.delivered, col(Outbox.pending).is_(False))


def _old_delivered(cut: Cutoffs) -> ColumnElement[bool] | None:
    if cut.delivered is None:
        return None
    return and_(
        col(EventDelivery.state) == DeliveryState.DELIVERED, col(EventDelivery.finished_at) < cut.delivered
    )


def _orphans_given_up(cut: Cutoffs) -> ColumnElement[bool] | None:
    """Given up long ago, for a booking id no meeting has (a feed's own events)."""
    if cut.bookings is None:
        return None
    return and_(
        col(EventDelivery.state) == DeliveryState.UNDELIVERED,
        col(EventDelivery.finished_at) < cut.bookings,
        ~exists().where(col(Meeting.booking_id) == col(EventDelivery.booking_id)),
    )


def _old_applied_webhooks(cut: Cutoffs) -> ColumnElement[bool] | None:
    """Applied long ago, for no room the store holds (another service's, say): those of a stored
    room go with its meeting."""
    if cut.bookings is None:
        return None
    return and_(
        col(WebhookEvent.received_at) < cut.bookings,
        col(WebhookEvent.applied_at).is_not(None),
        ~exists().where(col(Room.whereby_id) == col(WebhookEvent.whereby_id)),
    )


# --------------------------------------------------------------------------------------------
# The batches.


def _deleted(session: Session, statement: Any) -> int:
    result: Any = session.execute(statement.execution_options(synchronize_session=False))
    return int(result.rowcount or 0)  # a CursorResult: DELETE reports the rows it removed


def _meetings_batch(session: Session, state: str, cutoff: datetime, limit: int) -> tuple[Counter[str], bool]:
    """Prune up to `limit` meetings in `state` with all their rows. Returns (removed, maybe more)."""
    # Locked (PostgreSQL; SQLite's writer holds the whole store from BEGIN): a reschedule of one of
    # these ids waits for this commit and then books it anew, and one under way is skipped here.
    picked = session.execute(
        select(col(Meeting.id), col(Meeting.booking_id))
        .where(_prunable(cutoff, state))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    removed: Counter[str] = Counter()
    if not picked:
        return removed, False
    ids = [row[0] for row in picked]
    bookings = [row[1] for row in picked]
    whereby_ids = list(
        session.execute(
            select(col(Room.whereby_id)).where(
                col(Room.meeting_pk).in_(ids), col(Room.whereby_id).is_not(None)
            )
        ).scalars()
    )
    if whereby_ids:
        removed["webhook_event"] = _deleted(
            session, delete(WebhookEvent).where(col(WebhookEvent.whereby_id).in_(whereby_ids))
        )
    removed["history"] = _deleted(session, delete(History).where(col(History.booking_id).in_(bookings)))
    removed["outbox"] = _deleted(session, delete(Outbox).where(col(Outbox.booking_id).in_(bookings)))
    removed["event_delivery"] = _deleted(
        session, delete(EventDelivery).where(col(EventDelivery.booking_id).in_(bookings))
    )
    removed["room"] = _deleted(session, delete(Room).where(col(Room.meeting_pk).in_(ids)))
    removed["meeting"] = _deleted(session, delete(Meeting).where(col(Meeting.id).in_(ids)))
    return +removed, len(picked) >= limit


def _rows_batch(
    session: Session, model: Any, table: str, where: ColumnElement[bool], limit: int
) -> tuple[Counter[str], bool]:
    """Delete up to `limit` rows of one table matching `where` (found through an index range)."""
    chosen = select(model.id).where(where).limit(limit).scalar_subquery()
    count = _deleted(session, delete(model).where(model.id.in_(chosen)))
    return Counter({table: count}) if count else Counter(), count >= limit


Batch = Callable[[Session], tuple[Counter[str], bool]]


def _steps(cut: Cutoffs, batch_meetings: int, batch_rows: int) -> Iterator[tuple[str, Batch]]:
    """Each kind of batch, in order; each is repeated while it finds a full batch."""
    bookings = cut.bookings
    if bookings is not None:
        for state in FINAL:
            yield (
                f"{state} meetings",
                partial(_meetings_batch, state=state, cutoff=bookings, limit=batch_meetings),
            )
    flat = (
        ("event_delivery", EventDelivery, _old_delivered(cut)),
        ("outbox", Outbox, _old_sent_outbox(cut)),
        ("event_delivery", EventDelivery, _orphans_given_up(cut)),
        ("webhook_event", WebhookEvent, _old_applied_webhooks(cut)),
    )
    for table, model, where in flat:
        if where is not None:
            yield table, partial(_rows_batch, model=model, table=table, where=where, limit=batch_rows)


@dataclass
class Report:
    removed: Counter[str]
    batches: int
    seconds: float
    longest_batch: float  # the longest any batch held the store, seconds


def prune(
    now: datetime | None = None,
    *,
    batch_meetings: int = BATCH_MEETINGS,
    batch_rows: int = BATCH_ROWS,
    pause: float = PAUSE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    on_batch: Callable[[Counter[str]], None] | None = None,
) -> Report:
    """Prune everything past its retention now, a batch per transaction, until nothing is left."""
    settings = get_settings()
    now = now or utcnow()
    cut = cutoffs(now, settings)
    started = time.monotonic()
    report = Report(Counter(), 0, 0.0, 0.0)
    for _name, batch in _steps(cut, batch_meetings, batch_rows):
        more = True
        while more:
            began = time.monotonic()
            with session_scope() as session:
                removed, more = batch(session)
            took = time.monotonic() - began
            report.batches += 1
            report.longest_batch = max(report.longest_batch, took)
            if removed:
                report.removed += removed
                metrics.record_pruned(removed)
                if on_batch is not None:
                    on_batch(removed)
            if more:
                # Out of the transaction: writers waiting for the store go first.
                sleep(max(pause, took))
    report.seconds = time.monotonic() - started
    metrics.record_prune_run(time.time(), report.seconds, sum(report.removed.values()))
    if report.removed:
        log.info(
            "pruned %s in %d batches, %.1f s (longest batch %.3f s)",
            ", ".join(f"{n} {table}" for table, n in sorted(report.removed.items())),
            report.batches,
            report.seconds,
            report.longest_batch,
        )
    return report


def preview(now: datetime | None = None) -> dict[str, int]:
    """What `prune` would remove now, per table, removing nothing (`roomkeeper prune --dry-run`)."""
    settings = get_settings()
    now = now or utcnow()
    cut = cutoffs(now, settings)
    counts = dict.fromkeys(TABLES, 0)
    with _reading() as connection:

        def count(model: Any, *alternatives: ColumnElement[bool] | None) -> int:
            given = [where for where in alternatives if where is not None]
            if not given:
                return 0
            query = select(func.count()).select_from(model).where(or_(*given))
            return int(connection.execute(query).scalar_one())

        doomed_pk: Any = None
        doomed_id: Any = None
        rooms_whereby: Any = None
        if cut.bookings is not None:
            counts["meeting"] = count(Meeting, _prunable(cut.bookings))
            doomed_pk = col(Room.meeting_pk).in_(select(col(Meeting.id)).where(_prunable(cut.bookings)))
            doomed_id = select(col(Meeting.booking_id)).where(_prunable(cut.bookings))
            rooms_whereby = col(WebhookEvent.whereby_id).in_(select(col(Room.whereby_id)).where(doomed_pk))
            counts["room"] = count(Room, doomed_pk)
            counts["history"] = count(History, col(History.booking_id).in_(doomed_id))
        counts["webhook_event"] = count(WebhookEvent, rooms_whereby, _old_applied_webhooks(cut))
        counts["outbox"] = count(
            Outbox,
            col(Outbox.booking_id).in_(doomed_id) if doomed_id is not None else None,
            _old_sent_outbox(cut),
        )
        counts["event_delivery"] = count(
            EventDelivery,
            col(EventDelivery.booking_id).in_(doomed_id) if doomed_id is not None else None,
            _old_delivered(cut),
            _orphans_given_up(cut),
        )
    return counts


def _reading() -> Any:
    """A connection for counting. On SQLite, plain WAL reads (the store's own sessions take the
    write lock at BEGIN, which a dry run must not hold); on PostgreSQL the store's engine."""
    engine = store.get_engine()
    if engine.dialect.name == "sqlite":
        return metrics.read_connection()
    return engine.connect()
