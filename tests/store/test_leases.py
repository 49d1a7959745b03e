"""The one lease mechanism (worker/store/leases.py) on SQLite and PostgreSQL: a row goes to one
holder at a time, a lapsed lease may be taken over, renewals and releases touch only what the
holder still holds. Shown on delivery rows; meetings, rooms, feeds and the outbox use the same code."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlmodel import col, select

from worker.store import journal, leases, session_scope
from worker.store.models import EventDelivery, utcnow

pytestmark = pytest.mark.usefixtures("configured")


def rows(count: int) -> list[int]:
    now = utcnow()
    with session_scope() as session:
        made = [
            EventDelivery(**journal.delivery_row(f"lease-{i}", "room.ready", "https://x.test/", {}, now))
            for i in range(count)
        ]
        session.add_all(made)
        session.flush()
        return [row.id for row in made if row.id is not None]


def take(pk: int, token: str, now: datetime, lease: float = 30) -> bool:
    with session_scope() as session:
        taken = leases.take(
            session,
            EventDelivery,
            col(EventDelivery.id) == pk,
            leases.lapsed(EventDelivery, now),
            now + timedelta(seconds=lease),
            token=token,
        )
    return len(taken) == 1


def holder(pk: int) -> tuple[str | None, datetime | None]:
    with session_scope() as session:
        row = session.execute(select(EventDelivery).where(col(EventDelivery.id) == pk)).scalar_one()
        return row.claim_token, row.claim_until


def test_a_row_goes_to_one_holder_until_its_lease_lapses() -> None:
    (pk,) = rows(1)
    now = utcnow()
    assert take(pk, "first", now)
    assert not take(pk, "second", now + timedelta(seconds=29)), "the lease is alive"
    assert holder(pk)[0] == "first"
    assert take(pk, "second", now + timedelta(seconds=31)), "the first holder stopped renewing"
    assert holder(pk)[0] == "second"


def test_of_many_racing_for_a_row_exactly_one_gets_it() -> None:
    (pk,) = rows(1)
    now = utcnow()
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: take(pk, f"racer-{i}", now), range(16)))
    assert won.count(True) == 1
    assert holder(pk)[0] == f"racer-{won.index(True)}"


def test_renewal_extends_only_the_leases_still_held_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "RENEW_CHUNK", 2)  # several statements for five rows
    pks = rows(5)
    now = utcnow()
    for pk in pks:
        assert take(pk, "mine", now)
    with session_scope() as session:  # one row was taken over after its lease lapsed
        leases.take(
            session,
            EventDelivery,
            col(EventDelivery.id) == pks[0],
            leases.lapsed(EventDelivery, now + timedelta(minutes=1)),
            now + timedelta(minutes=2),
            token="theirs",
        )
    until = now + timedelta(minutes=5)
    with session_scope() as session:
        alive = leases.renew(session, EventDelivery, [(pk, "mine") for pk in pks], until)
    assert alive == {(pk, "mine") for pk in pks[1:]}
    assert {holder(pk)[1] for pk in pks[1:]} == {until}
    assert holder(pks[0]) == ("theirs", now + timedelta(minutes=2))


def test_release_lets_go_only_of_a_row_still_held_and_may_hand_it_on() -> None:
    pk, other = rows(2)
    now = utcnow()
    assert take(pk, "mine", now) and take(other, "mine", now)
    with session_scope() as session:
        assert not leases.release(session, EventDelivery, pk, "not-mine", attempts=7)
    assert holder(pk)[0] == "mine"
    with session_scope() as session:
        assert leases.release(session, EventDelivery, pk, "mine", attempts=7)
        assert leases.release(session, EventDelivery, other, "mine", claim_token="next", claim_until=now)
    assert holder(pk) == (None, None)
    assert holder(other) == ("next", now)
    with session_scope() as session:
        assert (
            session.execute(select(EventDelivery.attempts).where(col(EventDelivery.id) == pk)).scalar_one()
            == 7
        )
    assert take(pk, "again", now), "a released row is free"
