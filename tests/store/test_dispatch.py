"""The dispatcher on its own: what it claims, what it sends and with which ETA, with no worker running."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from tests.conftest import apply_settings
from worker.devtools.sandbox import SandboxAdmin
from worker.jobs import creation, deletion, dispatch, outbox
from worker.jobs.call_failures import WherebyCallFailed
from worker.runtime.app import app
from worker.store import claims, session_scope
from worker.store.models import Meeting, MeetingState, Outbox, Room, RoomState, utcnow

pytestmark = pytest.mark.usefixtures("configured", "sandbox")


@dataclass(frozen=True)
class Sent:
    task: str
    kwargs: dict[str, Any]
    eta: datetime | None
    queue: str | None


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Every message the dispatcher would send, instead of sending it."""
    records: list[Sent] = []
    lock = threading.Lock()

    def record(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        with lock:
            records.append(Sent(name, dict(kwargs or {}), options.get("eta"), options.get("queue")))

    monkeypatch.setattr(app, "send_task", record)
    return records


def store_meetings(prefix: str, count: int, due_in: float) -> list[int]:
    """Meetings as the store holds them once booked, their room creation due `due_in` seconds from now."""
    now = utcnow()
    due = now + timedelta(seconds=due_in)
    start = max(due, now) + timedelta(minutes=15)
    rows = [
        Meeting(
            booking_id=f"{prefix}-{i}",
            state=MeetingState.SCHEDULED,
            start=start,
            end=start + timedelta(minutes=30),
            create_at=due,
            room_end=start + timedelta(minutes=30),
            due_at=due,
            created_at=now,
            updated_at=now,
        )
        for i in range(count)
    ]
    with session_scope() as session:
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows if row.id is not None]


def creations(sent: list[Sent]) -> list[int]:
    return [s.kwargs["meeting_pk"] for s in sent if s.task == "rooms.create_room"]


def claims_of(pks: list[int]) -> dict[int, str | None]:
    with session_scope() as session:
        rows = session.exec(select(Meeting).where(col(Meeting.id).in_(pks)))
        return {row.id: row.claim_token for row in rows if row.id is not None}


def test_two_dispatchers_at_once_send_each_due_meeting_once(sent: list[Sent]) -> None:
    pks = store_meetings("due", 50, due_in=-60)
    barrier = threading.Barrier(2)

    def dispatcher() -> dict[str, int]:
        barrier.wait()
        return dispatch.dispatch_due()

    before = utcnow()
    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(dispatcher), pool.submit(dispatcher)]]
    after = utcnow()

    assert len(sent) == 50
    assert sorted(creations(sent)) == sorted(pks)  # every one, none twice
    assert sum(r["create"] for r in results) == 50
    assert all(r["delete"] == 0 for r in results)
    assert {s.queue for s in sent} == {"rooms"}
    # Overdue work goes at once, not at its long-past instant.
    assert all(s.eta is not None and before <= s.eta <= after for s in sent)
    # Each message carries the claim the store holds, so the worker that gets it can act.
    claims = claims_of(pks)
    assert all(claims[s.kwargs["meeting_pk"]] == s.kwargs["claim"] for s in sent)

    sent.clear()
    assert dispatch.dispatch_due() == {"create": 0, "delete": 0}  # claimed: not sent again
    assert sent == []

    # A dispatched message that no worker ever took (lost with a dead broker, say): once the
    # claim lapses, the next dispatch sends the work again.
    with session_scope() as session:
        session.execute(update(Meeting).values(claim_until=utcnow() - timedelta(seconds=1)))
    assert dispatch.dispatch_due() == {"create": 50, "delete": 0}
    assert sorted(creations(sent)) == sorted(pks)


def lapse(pks: list[int]) -> None:
    """As if every lease given so far had run out."""
    with session_scope() as session:
        lapsed = utcnow() - timedelta(seconds=1)
        session.execute(update(Meeting).where(col(Meeting.id).in_(pks)).values(claim_until=lapsed))


def test_a_message_held_by_a_live_worker_is_never_resent_however_late(sent: list[Sent]) -> None:
    """A backlog: a worker holds messages it cannot start yet and renews their leases. They are not
    sent again, however overdue; the messages nobody holds (lost, or their worker died) are, once,
    and then only after waiting as long again as they were overdue."""
    pks = store_meetings("backlog", 20, due_in=-3)
    assert dispatch.dispatch_due() == {"create": 20, "delete": 0}
    tokens = claims_of(pks)
    held, lost = pks[:10], pks[10:]
    for pk in held:  # what the worker's task_received hook does for each message it gets
        claims.message_received(Meeting, pk, str(tokens[pk]))
    sent.clear()
    lapse(pks)  # time passes: every lease the dispatcher gave runs out …
    for _ in range(3):
        claims.renewer.renew(claims.renewer.held(), 4.0)  # … but the worker renews the ones it holds
        dispatch.dispatch_due(overdue_only=True)
        lapse(held)  # (its renewals lapse in turn, and are renewed again)
    assert sorted(creations(sent)) == sorted(lost)  # sent again once, the held ones never
    resent = claims_of(lost)
    assert all(str(token).startswith(claims.RESEND_CLAIM) for token in resent.values())
    assert claims_of(held) == {pk: tokens[pk] for pk in held}
    with session_scope() as session:
        leases = [m.claim_until for m in session.exec(select(Meeting).where(col(Meeting.id).in_(lost)))]
    # Nobody received the copies yet: they wait at least a lease before the next one.
    assert all(until is not None and until >= utcnow() + timedelta(seconds=3) for until in leases)

    # The worker holding the first ten dies: its leases lapse, and they go again.
    for pk in held:
        claims.renewer.release((Meeting, pk, str(tokens[pk])))
    sent.clear()
    lapse(held)
    assert dispatch.dispatch_due(overdue_only=True)["create"] == 10
    assert sorted(creations(sent)) == sorted(held)


def test_a_message_not_yet_received_is_not_resent_while_the_broker_still_holds_messages(
    sent: list[Sent],
) -> None:
    """Workers far behind: messages wait in the broker to be received, and nothing renews their
    rows' leases yet. Those rows are not sent again until the broker's queue is empty; a row
    whose run died is sent again at once."""
    pks = store_meetings("unreceived", 4, due_in=-1)
    assert dispatch.dispatch_due()["create"] == 4
    died, unreceived = pks[:2], pks[2:]
    with session_scope() as session:
        session.execute(
            update(Meeting).where(col(Meeting.id).in_(died)).values(claim_token=claims.RUN_CLAIM + "dead")
        )
    lapse(pks)
    # A queue of its own that no worker consumes (the suite's in-process worker takes `rooms`).
    apply_settings(ROOMKEEPER_QUEUE="rooms-unreceived")
    try:
        with app.connection_for_write() as connection:
            waiting = connection.SimpleQueue("rooms-unreceived")
            try:
                waiting.put({"a message": "no worker has received yet"})
                sent.clear()
                assert dispatch.dispatch_due(overdue_only=True)["create"] == 2
                assert sorted(creations(sent)) == sorted(died)
            finally:
                waiting.clear()
                waiting.close()
        sent.clear()
        assert dispatch.dispatch_due(overdue_only=True)["create"] == 2  # the queue is empty now
    finally:
        apply_settings(ROOMKEEPER_QUEUE="rooms")
    assert sorted(creations(sent)) == sorted(unreceived)


def test_a_late_copy_does_the_work_if_nobody_started_it_and_nothing_if_somebody_did(
    sent: list[Sent], sandbox: SandboxAdmin
) -> None:
    """Sending a row again never spoils the copy already queued: the first to start makes the
    room, whichever it is; every other copy finds nothing to do."""
    (pk,) = store_meetings("copies", 1, due_in=-1)
    dispatch.dispatch_due()
    first = claims_of([pk])[pk]
    lapse([pk])
    assert dispatch.dispatch_due(overdue_only=True)["create"] == 1
    second = claims_of([pk])[pk]
    assert first != second and str(second).startswith(claims.RESEND_CLAIM)

    assert creation.create_room(pk, str(first)).startswith("room.ready")  # the older copy works
    assert creation.create_room(pk, str(second)) == claims.NOTHING_TO_DO
    assert creation.create_room(pk, str(first)) == claims.NOTHING_TO_DO
    assert len(sandbox.rooms()) == 1


def test_a_copy_arriving_before_its_row_is_due_changes_nothing(sent: list[Sent]) -> None:
    """A message of a row rescheduled later since it was sent: a no-op that leaves the row's
    claim to the message sent for its new instant."""
    (pk,) = store_meetings("early", 1, due_in=-1)
    dispatch.dispatch_due()
    stale = str(claims_of([pk])[pk])
    with session_scope() as session:
        session.execute(
            update(Meeting)
            .where(col(Meeting.id) == pk)
            .values(due_at=utcnow() + timedelta(minutes=10), claim_token=claims.DISPATCH_CLAIM + "new")
        )
    assert creation.create_room(pk, stale) == claims.NOTHING_TO_DO
    assert claims_of([pk])[pk] == claims.DISPATCH_CLAIM + "new"


def test_the_renewer_forgets_a_message_whose_row_moved_on() -> None:
    (pk,) = store_meetings("moved", 1, due_in=-1)
    dispatch_token = claims.DISPATCH_CLAIM + "gone"
    claims.message_received(Meeting, pk, dispatch_token)  # the row's claim is some other one
    claims.renewer.renew(claims.renewer.held(), 4.0)
    assert (Meeting, pk, dispatch_token) not in claims.renewer.held()


def test_dispatch_passes_never_overlap(sent: list[Sent], monkeypatch: pytest.MonkeyPatch) -> None:
    """While a pass runs, the recovery pass is skipped and a full pass waits for it."""
    store_meetings("overlap", 5, due_in=-1)
    inside = threading.Event()
    release = threading.Event()
    real = dispatch.claim_due
    active: list[int] = []
    most = [0]

    def slow(*args: Any, **kwargs: Any) -> list[dispatch.Claimed]:
        active.append(1)
        most[0] = max(most[0], len(active))
        inside.set()
        release.wait(5)
        try:
            return real(*args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(dispatch, "claim_due", slow)
    with ThreadPoolExecutor(3) as pool:
        full = pool.submit(dispatch.dispatch_due)
        assert inside.wait(5)
        assert dispatch.dispatch_due(overdue_only=True) == {"create": 0, "delete": 0}  # skipped
        second = pool.submit(dispatch.dispatch_due)
        time.sleep(0.3)
        release.set()
        assert full.result(10)["create"] == 5
        assert second.result(10)["create"] == 0
    assert most[0] == 1
    assert len(sent) == 5


def test_only_work_due_before_the_next_tick_is_sent_with_an_eta_at_its_instant(sent: list[Sent]) -> None:
    apply_settings(ROOMKEEPER_DISPATCH_INTERVAL_SECONDS="15")
    (in_ten_minutes,) = store_meetings("later", 1, due_in=600)
    (past_the_tick,) = store_meetings("next-tick", 1, due_in=30)
    (within_the_tick,) = store_meetings("this-tick", 1, due_in=10)
    with session_scope() as session:
        meeting = session.get(Meeting, in_ten_minutes)
        assert meeting is not None
        room_end = utcnow() + timedelta(seconds=8)
        room = Room(
            meeting_pk=in_ten_minutes,
            tag="abcdefgh",
            name_prefix="rk-abcdefgh-",
            state=RoomState.LIVE,
            whereby_id="4242",
            end_date=room_end,
            due_at=room_end,
            created_at=utcnow(),
            ready_at=utcnow(),
        )
        session.add(room)
        session.flush()
        room_pk = room.id
    due_instants: dict[int, datetime | None] = {}
    with session_scope() as session:
        for pk in (within_the_tick, past_the_tick, in_ten_minutes):
            row = session.get(Meeting, pk)
            assert row is not None
            due_instants[pk] = row.due_at

    assert dispatch.dispatch_due() == {"create": 1, "delete": 1}

    by_task = {s.task: s for s in sent}
    assert set(by_task) == {"rooms.create_room", "rooms.delete_room"}
    create = by_task["rooms.create_room"]
    assert create.kwargs["meeting_pk"] == within_the_tick
    # At its exact instant, not now and not a tick later.
    assert create.eta == due_instants[within_the_tick]
    delete = by_task["rooms.delete_room"]
    assert delete.kwargs["room_pk"] == room_pk
    assert delete.eta == room_end  # the room goes at its end, not up to an interval late
    claims = claims_of([within_the_tick, past_the_tick, in_ten_minutes])
    assert claims[past_the_tick] is None and claims[in_ten_minutes] is None


def test_dispatch_cost_follows_the_due_rows_not_the_stored_ones(sent: list[Sent]) -> None:
    store_meetings("far", 2000, due_in=30 * 24 * 3600)
    due = store_meetings("due", 5, due_in=-1)

    assert dispatch.dispatch_due() == {"create": 5, "delete": 0}

    assert sorted(creations(sent)) == sorted(due)


def test_more_due_work_than_one_batch_is_all_sent_once(sent: list[Sent]) -> None:
    due = store_meetings("batch", 5, due_in=-1)

    assert dispatch.dispatch_due(limit=2) == {"create": 5, "delete": 0}

    assert Counter(creations(sent)) == Counter(due)


def test_a_failed_deletion_is_sent_again_at_its_retry_instant_not_at_the_next_tick(
    sent: list[Sent], sandbox: SandboxAdmin
) -> None:
    apply_settings(ROOMKEEPER_DISPATCH_INTERVAL_SECONDS="60")
    (meeting_pk,) = store_meetings("deleting", 1, due_in=-600)
    now = utcnow()
    with session_scope() as session:
        meeting = session.get(Meeting, meeting_pk)
        assert meeting is not None
        meeting.due_at = None
        meeting.state = MeetingState.DELETING
        room = Room(
            meeting_pk=meeting_pk,
            tag="t0delete",
            name_prefix="rk-t0delete-",
            state=RoomState.LIVE,
            whereby_id="4242",
            end_date=now,
            due_at=now,
            created_at=now - timedelta(minutes=30),
            ready_at=now - timedelta(minutes=30),
        )
        session.add(room)
        session.flush()
        room_pk = room.id
        assert room_pk is not None
    assert dispatch.dispatch_due(room_ids={room_pk}) == {"create": 0, "delete": 1}
    (first,) = sent
    sent.clear()

    sandbox.script({"method": "DELETE", "action": "rate_limit", "retry_after": 2})
    # The task fails (FAILURE in Flower, with its booking and reason) once the retry is stored.
    with pytest.raises(WherebyCallFailed, match=r"booking deleting-0: RateLimitedError: .* 429"):
        deletion.delete_room(room_pk, first.kwargs["claim"])

    # Sent again right after the failure, with its ETA at the retry instant (Retry-After), not
    # left in the store for a dispatcher tick up to a minute away.
    (again,) = sent
    assert again.task == "rooms.delete_room" and again.kwargs["room_pk"] == room_pk
    assert again.eta is not None
    assert timedelta(seconds=1.5) <= again.eta - now <= timedelta(seconds=8)


def test_events_committed_while_another_thread_flushes_are_all_sent_once(
    sent: list[Sent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One flush runs per process at a time, and a commit that finds it running leaves its events
    to it. Once every flush_outbox call has returned, no committed event may be left unsent."""
    record = app.send_task

    def slow_send(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.002)  # widens the window in which other threads commit and find it running
        record(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", slow_send)
    returned: list[int] = []

    def commit_an_event_and_flush(i: int) -> None:
        with session_scope() as session:
            session.add(
                Outbox(
                    created_at=utcnow(),
                    booking_id=f"flush-{i}",
                    task="bookings.room_event",
                    queue="events",
                    kwargs={"n": i},
                )
            )
        returned.append(outbox.flush_outbox())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(commit_an_event_and_flush, range(200)))
    with session_scope() as session:
        unsent = session.execute(select(Outbox.id).where(col(Outbox.pending).is_(True))).all()
    assert unsent == []
    times_sent = Counter(s.kwargs["n"] for s in sent if s.task == "bookings.room_event")
    assert sorted(times_sent) == list(range(200))
    assert set(times_sent.values()) == {1}
    assert sum(returned) == 200
    assert returned.count(0) > 0  # some commits did leave their events to a running flush


def test_a_claim_is_renewed_while_its_whereby_call_is_slow(sandbox: SandboxAdmin) -> None:
    """The process's renewer keeps a running creation's claim alive past its first lease, so no
    recovery pass takes the meeting over while Whereby is still answering."""
    apply_settings(ROOMKEEPER_CLAIM_LEASE_SECONDS="1")
    try:
        (pk,) = store_meetings("renew", 1, due_in=-1)
        with session_scope() as session:
            claimed = dispatch.claim_due(session, Meeting, utcnow(), utcnow(), {pk}, 10, timedelta(seconds=1))
        sandbox.set_faults(latency_ms=2500)
        with ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(creation.create_room, pk, claimed[0].claim)
            time.sleep(2.0)  # two leases after the claim was taken
            with session_scope() as session:
                meeting = session.get(Meeting, pk)
                assert meeting is not None and meeting.claim_token is not None
                assert meeting.claim_token.startswith(claims.RUN_CLAIM)
                assert meeting.claim_until is not None and meeting.claim_until > utcnow()
            assert dispatch.dispatch_due(overdue_only=True)["create"] == 0
            assert outcome.result(timeout=10).startswith("room.ready")
    finally:
        sandbox.set_faults(latency_ms=0)
        apply_settings(ROOMKEEPER_CLAIM_LEASE_SECONDS=None)


def test_a_late_finisher_leaving_does_not_stop_the_renewal_of_the_run_that_took_over() -> None:
    """Both runs of one meeting in one process: the one whose claim lapsed finishes first, and the
    run holding the claim now must still be renewed."""
    apply_settings(ROOMKEEPER_CLAIM_LEASE_SECONDS="1")
    try:
        (pk,) = store_meetings("late", 1, due_in=3600)
        current = claims.RUN_CLAIM + "current"
        with session_scope() as session:
            session.execute(
                update(Meeting)
                .where(col(Meeting.id) == pk)
                .values(claim_token=current, claim_until=utcnow() + timedelta(seconds=1))
            )
        with claims.renewer.holding(Meeting, pk, current):
            with claims.renewer.holding(Meeting, pk, claims.RUN_CLAIM + "lapsed"):
                pass  # the late finisher is done
            time.sleep(2.0)  # two leases
            with session_scope() as session:
                meeting = session.get(Meeting, pk)
                assert meeting is not None and meeting.claim_token == current
                assert meeting.claim_until is not None and meeting.claim_until > utcnow()
    finally:
        apply_settings(ROOMKEEPER_CLAIM_LEASE_SECONDS=None)
