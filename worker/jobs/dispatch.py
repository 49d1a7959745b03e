"""The dispatcher: claims the creations and deletions due before its next tick and sends each one
as a task with an exact ETA. Beat runs it every dispatch interval, and its recovery pass every few
seconds; a transaction that makes work due at once runs it for just those rows after commit.

A row is sent again only when nothing holds it any more: its lease lapsed because the worker
holding its message (or running it) died, or because no worker ever received the message. A row
merely late behind a backlog is held by the live worker that has its message (`worker/store/claims.py`),
so a backlog costs no copies; and a copy that does arrive is harmless (the first one to start does
the work, the others find nothing to do).
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, or_, update
from sqlmodel import Session, col, select

from config.settings import Settings, get_settings
from worker.runtime.app import app
from worker.store import leases, session_scope
from worker.store.claims import DISPATCH_CLAIM, RESEND_CLAIM, RUN_CLAIM, M
from worker.store.models import Meeting, Room, utcnow

log = logging.getLogger(__name__)

CREATE_TASK = "rooms.create_room"
DELETE_TASK = "rooms.delete_room"
# A row sent again waits, before the next copy, as long again as it was overdue (at most this
# long) unless a worker receives it and renews its lease: while no worker runs at all, an outage
# costs a few copies a row, not one every recovery pass.
RESEND_WAIT_MAX = timedelta(minutes=5)
# One pass at a time in a process: the dispatcher and its recovery pass never race each other.
# (Two beats are safe too: a claim is a conditional UPDATE, so a row goes to one of them.)
_pass_lock = threading.Lock()
PASS_WAIT_SECONDS = 30.0
# Rows claimed and sent per round: a claim's lease starts when it is taken, so a round is sent
# within a second of it even when thousands are due at once.
CHUNK = 500
# Creations are sent at the broker's lowest priority (Redis: 0 is taken first, 9 last): under a
# backlog a worker receives deletions and callers' requests before the creations ahead of them.
CREATE_PRIORITY = 9


@dataclass(frozen=True)
class Claimed:
    pk: int
    due_at: datetime
    claim: str
    booking_id: str


def dispatch_horizon(now: datetime, settings: Settings) -> datetime:
    """Work due before this instant is sent now, with an ETA; later work waits for a later tick."""
    return now + timedelta(seconds=settings.dispatch_interval_seconds + 1)


def unheld(model: type[M], now: datetime) -> ColumnElement[bool]:
    """No message or run of the row is alive: never sent, done with, or its lease lapsed."""
    return leases.lapsed(model, now)


def claim_due(
    session: Session,
    model: type[M],
    now: datetime,
    horizon: datetime,
    ids: set[int] | None,
    limit: int,
    lease: timedelta,
    broker_idle: bool = True,
) -> list[Claimed]:
    """Claim the rows due before `horizon` that nothing holds, soonest first: rows never sent get
    a dispatch claim, rows whose holder died (or whose message was lost) a resend claim.

    `broker_idle`: no message waits in the broker to be received. Until then a row whose message
    nobody has renewed may simply not have been received yet (workers far behind), so only rows
    whose run died are sent again."""
    due = and_(col(model.due_at).is_not(None), col(model.due_at) <= horizon, unheld(model, now))
    if not broker_idle:
        due = and_(
            due,
            or_(
                col(model.claim_token).is_(None),
                col(model.claim_token).startswith(RUN_CLAIM),
            ),
        )
    candidates = select(model.id, model.claim_token).where(due)
    if ids is not None:
        candidates = candidates.where(col(model.id).in_(ids))
    picked = session.execute(candidates.order_by(col(model.due_at)).limit(limit)).all()
    if not picked:
        return []
    fresh = [pk for pk, token in picked if token is None]
    lapsed = [pk for pk, token in picked if token is not None]
    owner = col(Meeting.booking_id) if model is Meeting else col(Room.meeting_pk)
    rows: list[tuple[int, datetime, object, str]] = []
    for pks, prefix in ((fresh, DISPATCH_CLAIM), (lapsed, RESEND_CLAIM)):
        if not pks:
            continue
        token = prefix + uuid.uuid4().hex
        # The lease covers the message until a worker receives it and renews it itself: a lease
        # past the row's ETA (due now: from now).
        until = case((col(model.due_at) <= now, now + lease), else_=horizon + lease)
        returned = leases.take(
            session,
            model,
            col(model.id).in_(pks),
            due,
            until,
            token=token,
            returning=(col(model.id), col(model.due_at), owner),
        )
        rows.extend((pk, due_at, meeting, token) for pk, due_at, meeting in returned)
        if prefix == RESEND_CLAIM:
            overdue = [(pk, due_at) for pk, due_at, _ in returned if due_at <= now]
            _back_off_resends(session, model, overdue, now, lease)
    rows.sort(key=lambda row: row[1])
    if model is Room and rows:
        # The booking id travels in the message only so that operators can tell, in Flower,
        # which booking a room task is about.
        meeting_pks = {meeting_pk for _, _, meeting_pk, _ in rows}
        bookings = dict(
            session.execute(
                select(Meeting.id, Meeting.booking_id).where(col(Meeting.id).in_(meeting_pks))
            ).all()
        )
        return [Claimed(pk, due_at, token, bookings.get(meeting, "")) for pk, due_at, meeting, token in rows]
    return [Claimed(pk, due_at, token, str(booking)) for pk, due_at, booking, token in rows]


def _back_off_resends(
    session: Session, model: type[M], rows: Sequence[tuple[int, datetime]], now: datetime, lease: timedelta
) -> None:
    """Give each row sent again, until a worker receives it, a lease as long as it was overdue
    (whole seconds, rounded up to a power of two, so a pass needs a few UPDATEs, not one a row)."""
    by_wait: dict[timedelta, list[int]] = {}
    for pk, due_at in rows:
        overdue = max(lease, min(now - due_at, RESEND_WAIT_MAX))
        wait = timedelta(seconds=2 ** math.ceil(math.log2(max(overdue.total_seconds(), 1))))
        by_wait.setdefault(wait, []).append(pk)
    for wait, pks in by_wait.items():
        session.execute(update(model).where(col(model.id).in_(pks)).values(claim_until=now + wait))


def dispatch_due(
    meeting_ids: set[int] | None = None,
    room_ids: set[int] | None = None,
    limit: int = CHUNK,
    overdue_only: bool = False,
) -> dict[str, int]:
    """Claim due creations and deletions and send each with an ETA at its due instant, deletions
    first (a room that must go outranks a room that may be made a moment later).

    `overdue_only`: the frequent recovery pass: only work already due that nothing holds (a dead
    worker's, a lost message's). It is skipped while another pass runs in this process; the full
    pass waits for one that runs.
    """
    only_some = meeting_ids is not None or room_ids is not None
    if only_some:  # rows this transaction just made due: their claims keep them apart from any pass
        return _dispatch(meeting_ids, room_ids, limit, overdue_only)
    if overdue_only:
        acquired = _pass_lock.acquire(blocking=False)
    else:
        acquired = _pass_lock.acquire(timeout=PASS_WAIT_SECONDS)
    if not acquired:
        log.debug("dispatch pass skipped: another pass is running")
        return {"create": 0, "delete": 0}
    try:
        return _dispatch(None, None, limit, overdue_only)
    finally:
        _pass_lock.release()


def _dispatch(
    meeting_ids: set[int] | None, room_ids: set[int] | None, limit: int, overdue_only: bool
) -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    horizon = now if overdue_only else dispatch_horizon(now, settings)
    lease = timedelta(seconds=settings.claim_lease_seconds)
    counts = {"create": 0, "delete": 0}
    only_some = meeting_ids is not None or room_ids is not None
    # Only a pass asks the broker: the rows a transaction just made due are few, were released by
    # it or never sent, and a worker's hot path should not open a broker connection per commit.
    idle = True if only_some else broker_idle(settings.queue)
    while True:
        with session_scope() as session:
            deletions: list[Claimed] = []
            if not only_some or room_ids:
                deletions = claim_due(session, Room, now, horizon, room_ids, limit, lease, idle)
        _send(DELETE_TASK, "room_pk", deletions, now, settings)
        with session_scope() as session:
            creations: list[Claimed] = []
            if not only_some or meeting_ids:
                creations = claim_due(session, Meeting, now, horizon, meeting_ids, limit, lease, idle)
        _send(CREATE_TASK, "meeting_pk", creations, now, settings, priority=CREATE_PRIORITY)
        counts["create"] += len(creations)
        counts["delete"] += len(deletions)
        if len(creations) < limit and len(deletions) < limit:
            break
    if counts["create"] or counts["delete"]:
        log.info(
            "%s %d creations and %d deletions",
            "recovered" if overdue_only else "dispatched",
            counts["create"],
            counts["delete"],
        )
    return counts


def broker_idle(queue: str) -> bool:
    """Whether no message waits in the broker's queue to be received by a worker (False when the
    broker does not answer: then nothing is known to be lost)."""
    try:
        with app.connection_for_read() as connection:
            try:
                declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors:  # never declared: no message was ever sent to it
                return True
            waiting: int = declared.message_count
    except Exception:
        log.warning("could not read the broker's queue %s; nothing is sent again this pass", queue)
        return False
    return waiting == 0


def _send(
    task: str, kwarg: str, rows: Sequence[Claimed], now: datetime, settings: Settings, priority: int = 0
) -> None:
    if not rows:
        return
    # One producer for the whole round, not one from the pool per message.
    with app.producer_or_acquire() as producer:
        for row in rows:
            # Nobody waits on these results: the message says so, or it would override the task's
            # own ignore_result and cost three result-backend round trips a task.
            app.send_task(
                task,
                kwargs={kwarg: row.pk, "claim": row.claim, "booking_id": row.booking_id},
                queue=settings.queue,
                eta=max(row.due_at, now),
                ignore_result=True,
                priority=priority,
                producer=producer,
            )
