"""The dispatcher: claims the creations and deletions due before its next tick and sends each one
as a task with an exact ETA. Beat runs it every dispatch interval (and its recovery pass every few
seconds); a transaction that makes work due at once runs it for just those rows after commit."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, update
from sqlmodel import Session, col, select

from config.settings import Settings, get_settings
from worker.app import app
from worker.claims import DISPATCH_CLAIM, RESEND_CLAIM, RUN_CLAIM, M
from worker.models import Meeting, Room, utcnow
from worker.store import session_scope

log = logging.getLogger(__name__)

CREATE_TASK = "rooms.create_room"
DELETE_TASK = "rooms.delete_room"
# Work sent but not started this long after its instant is sent again by the recovery pass.
OVERDUE_GRACE = timedelta(seconds=2)
# A resent row is not resent again before it has waited as long again as it was overdue (at most
# this long): a worker that died loses its work for seconds, while a backlog (workers far behind,
# not dead) costs a few duplicate messages a row instead of one every recovery pass.
RESEND_WAIT_MAX = timedelta(minutes=5)


@dataclass(frozen=True)
class Claimed:
    pk: int
    due_at: datetime
    claim: str
    booking_id: str


def dispatch_horizon(now: datetime, settings: Settings) -> datetime:
    """Work due before this instant is sent now, with an ETA; later work waits for a later tick."""
    return now + timedelta(seconds=settings.dispatch_interval_seconds + 1)


def claim_due(
    session: Session,
    model: type[M],
    now: datetime,
    horizon: datetime,
    ids: set[int] | None,
    limit: int,
    lease: timedelta,
    overdue_before: datetime | None = None,
) -> list[Claimed]:
    """Claim, in one conditional UPDATE … RETURNING, the rows due before `horizon`, soonest first."""
    token = (RESEND_CLAIM if overdue_before is not None else DISPATCH_CLAIM) + uuid.uuid4().hex
    claimable = or_(col(model.claim_until).is_(None), col(model.claim_until) < now)
    if overdue_before is not None:
        # Sent but still not started well after its instant: the worker holding the message is
        # gone. Send it again; whichever copy starts first does the work. Not while runs of work
        # due no later than it are going: workers take messages in due order, so that is a queue
        # being worked through, where a copy would only add a duplicate to the same queue. A row
        # sent again is held by its resend claim (`_back_off_resends`) until that runs out.
        earliest_running = (
            select(func.min(model.due_at))
            .where(
                col(model.due_at).is_not(None),
                col(model.due_at) <= now,
                col(model.claim_token).startswith(RUN_CLAIM),
                col(model.claim_until) > now,
            )
            .scalar_subquery()
        )
        claimable = or_(
            claimable,
            and_(
                col(model.claim_token).startswith(DISPATCH_CLAIM),
                col(model.due_at) <= overdue_before,
                or_(earliest_running.is_(None), col(model.due_at) < earliest_running),
            ),
        )
    due = and_(col(model.due_at).is_not(None), col(model.due_at) <= horizon, claimable)
    candidates = select(model.id).where(due)
    if ids is not None:
        candidates = candidates.where(col(model.id).in_(ids))
    picked = list(session.execute(candidates.order_by(col(model.due_at)).limit(limit)).scalars())
    if not picked:
        return []
    owner = col(Meeting.booking_id) if model is Meeting else col(Room.meeting_pk)
    rows = session.execute(
        update(model)
        .where(col(model.id).in_(picked), due)
        .values(claim_token=token, claim_until=horizon + lease)
        .returning(col(model.id), col(model.due_at), owner)
    ).all()
    if overdue_before is not None and rows:
        _back_off_resends(session, model, [(pk, due_at) for pk, due_at, _ in rows], now, lease)
    if model is Room and rows:
        # The booking id travels in the message only so that operators can tell, in Flower,
        # which booking a room task is about.
        pks = {meeting_pk for _, _, meeting_pk in rows}
        bookings = dict(
            session.execute(select(Meeting.id, Meeting.booking_id).where(col(Meeting.id).in_(pks))).all()
        )
        return [Claimed(pk, due_at, token, bookings.get(meeting_pk, "")) for pk, due_at, meeting_pk in rows]
    return [Claimed(pk, due_at, token, booking_id) for pk, due_at, booking_id in rows]


def _back_off_resends(
    session: Session, model: type[M], rows: Sequence[tuple[int, datetime]], now: datetime, lease: timedelta
) -> None:
    """Hold each resent row until it has waited as long again as it was overdue (whole seconds,
    rounded up to a power of two, so a pass needs a few UPDATEs, not one a row)."""
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
    limit: int = 2000,
    overdue_only: bool = False,
) -> dict[str, int]:
    """Claim due creations and deletions and send each with an ETA at its due instant.

    `overdue_only`: the frequent recovery pass: only work already due whose claim lapsed (a
    killed worker stops renewing it) or whose message was never started.
    """
    settings = get_settings()
    now = utcnow()
    horizon = dispatch_horizon(now, settings)
    overdue_before = None
    if overdue_only:
        horizon = now
        overdue_before = now - OVERDUE_GRACE
    lease = timedelta(seconds=settings.claim_lease_seconds)
    counts = {"create": 0, "delete": 0}
    only_some = meeting_ids is not None or room_ids is not None
    while True:
        with session_scope() as session:
            creations: list[Claimed] = []
            if not only_some or meeting_ids:
                creations = claim_due(
                    session, Meeting, now, horizon, meeting_ids, limit, lease, overdue_before
                )
            deletions: list[Claimed] = []
            if not only_some or room_ids:
                deletions = claim_due(session, Room, now, horizon, room_ids, limit, lease, overdue_before)
        _send(CREATE_TASK, "meeting_pk", creations, now, settings)
        _send(DELETE_TASK, "room_pk", deletions, now, settings)
        counts["create"] += len(creations)
        counts["delete"] += len(deletions)
        if len(creations) < limit and len(deletions) < limit:
            break
    if counts["create"] or counts["delete"]:
        log.info("dispatched %d creations and %d deletions", counts["create"], counts["delete"])
    return counts


def _send(task: str, kwarg: str, rows: Sequence[Claimed], now: datetime, settings: Settings) -> None:
    for row in rows:
        # Nobody waits on these results: the message says so, or it would override the task's
        # own ignore_result and cost three result-backend round trips a task.
        app.send_task(
            task,
            kwargs={kwarg: row.pk, "claim": row.claim, "booking_id": row.booking_id},
            queue=settings.queue,
            eta=max(row.due_at, now),
            ignore_result=True,
        )
