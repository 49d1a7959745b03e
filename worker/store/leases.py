"""Leases: the one way a process takes a row for a while (meetings, rooms, deliveries, feeds, the outbox).

A leased row carries `claim_until` (the lease: past it, the holder is presumed dead and anyone may
take the row) and, where several holders must tell themselves apart, `claim_token` (who holds it).
Taking is one conditional UPDATE: it matches only rows that are free (or lapsed, or whatever the
caller's own condition allows), so of two processes racing for a row exactly one gets it. A holder
renews its lease while it works and releases the row when done; a holder that died stops
renewing, and the row is taken again one lease later.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, update
from sqlmodel import Session, col

from worker.store.models import EventDelivery, Feed, Meeting, Outbox, Room

# The tables that hold leases; each has `id` and `claim_until`, all but the outbox `claim_token`.
Leased = type[Meeting] | type[Room] | type[EventDelivery] | type[Feed] | type[Outbox]
Tokened = type[Meeting] | type[Room] | type[EventDelivery] | type[Feed]
# Rows renewed per statement: well inside every database's limit on bound parameters.
RENEW_CHUNK = 500
# A meeting's or a room's lifecycle state is written by `worker/store/persist.py` alone: a lease
# on those rows writes its own columns and nothing else.
PERSIST_OWNS = frozenset({"meeting", "room"})


def _own_columns_only(model: Leased, values: dict[str, Any]) -> None:
    if values and model.__tablename__ in PERSIST_OWNS:
        raise TypeError(f"a lease on {model.__tablename__} writes only its own columns, not {sorted(values)}")


def new_token(prefix: str = "") -> str:
    """A holder's token: unique, so a token only ever matches the rows it was given to."""
    return prefix + uuid.uuid4().hex


def lapsed(model: Leased, now: datetime) -> ColumnElement[bool]:
    """Nobody holds the row: never leased, released, or its holder stopped renewing."""
    return or_(col(model.claim_until).is_(None), col(model.claim_until) < now)


def held_by(model: Tokened, token: str) -> ColumnElement[bool]:
    return col(model.claim_token) == token


def take(
    session: Session,
    model: Leased,
    where: ColumnElement[bool],
    free: ColumnElement[bool],
    until: Any,
    *,
    token: str | None = None,
    values: dict[str, Any] | None = None,
    returning: Sequence[Any] = (),
) -> Sequence[Any]:
    """Lease the rows matching `where` that are `free` (usually `lapsed`; a caller may allow more,
    such as its own token) until `until` (an instant, or a SQL expression), to `token` when the
    table has one; `values` are written in the same UPDATE. Returns `returning` of the rows taken."""
    _own_columns_only(model, values or {})
    leased: dict[str, Any] = {"claim_until": until, **(values or {})}
    if token is not None:
        leased["claim_token"] = token
    return (
        session.connection()
        .execute(
            update(model)
            .where(and_(where, free))
            .values(**leased)
            .returning(*(returning or (col(model.id),)))
        )
        .all()
    )


def renew(
    session: Session, model: Tokened, held: Sequence[tuple[int, str]], until: datetime
) -> set[tuple[int, str]]:
    """Extend the leases of the (row id, token) pairs still held as given; returns those. A row
    whose holder changed (or that was released) matches nothing: its lease is not this holder's."""
    alive: set[tuple[int, str]] = set()
    for start in range(0, len(held), RENEW_CHUNK):
        chunk = held[start : start + RENEW_CHUNK]
        # Tokens are unique (a run's) or one per dispatch pass: few, and a token can only match
        # the rows it was given to.
        renewed = session.execute(
            update(model)
            .where(
                col(model.id).in_({pk for pk, _ in chunk}),
                col(model.claim_token).in_({token for _, token in chunk}),
            )
            .values(claim_until=until)
            .returning(col(model.id), col(model.claim_token))
        ).all()
        alive.update((pk, token) for pk, token in renewed)
    return alive


def release(session: Session, model: Tokened, pk: int, token: str, **values: Any) -> bool:
    """Let go of the row if `token` still holds it, writing `values` in the same UPDATE (they may
    hand the row on: a new `claim_token` and `claim_until`). Whether it was still held."""
    _own_columns_only(model, {k: v for k, v in values.items() if k not in ("claim_token", "claim_until")})
    return (
        session.connection()
        .execute(
            update(model)
            .where(col(model.id) == pk, held_by(model, token))
            .values(**{"claim_token": None, "claim_until": None, **values})
            .returning(col(model.id))
        )
        .first()
        is not None
    )
