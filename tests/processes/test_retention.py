"""Retention (worker/jobs/retention.py): what goes, what stays, in bounded batches, on SQLite and PostgreSQL.

Rows are written as the service would have left them, dated months back; `retention.prune` and
`retention.preview` run as plain functions, `roomkeeper prune` through the CLI, and the figures are
read back through `/metrics` as Prometheus scrapes them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, text
from sqlmodel import col, select
from typer.testing import CliRunner

from config.settings import get_settings
from tests.conftest import BROKER, apply_settings
from tests.processes.test_metrics import scrape, value
from worker import store
from worker.adapters import metrics
from worker.devtools.harness import ProcessSystem, later, parse
from worker.devtools.sandbox import SandboxAdmin, SandboxServer
from worker.faces.cli.main import cli
from worker.faces.web.app import create_app
from worker.jobs import booking, retention
from worker.rules.validation import ScheduleRequest
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
)

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
MODELS = {
    "meeting": Meeting,
    "room": Room,
    "history": History,
    "outbox": Outbox,
    "event_delivery": EventDelivery,
    "webhook_event": WebhookEvent,
}


@pytest.fixture
def retained(database: str) -> Iterator[str]:
    """The test database with the default retention (90 days; delivered events 30)."""
    apply_settings(
        ROOMKEEPER_DATABASE_URL=database,
        ROOMKEEPER_BROKER_URL=BROKER,
        ROOMKEEPER_RETENTION_DAYS=None,
        ROOMKEEPER_DELIVERED_RETENTION_DAYS=None,
    )
    metrics._client().delete(metrics.PRUNE_KEY)
    yield database
    apply_settings(ROOMKEEPER_RETENTION_DAYS=None, ROOMKEEPER_DELIVERED_RETENTION_DAYS=None)


# --------------------------------------------------------------------------------------------
# Rows as the service leaves them.


def meeting(
    booking_id: str,
    state: MeetingState,
    end: datetime,
    room: RoomState | None = RoomState.DELETED,
    history: int = 3,
    webhooks: int = 2,
) -> str:
    """A meeting that ended at `end`, its room, history lines and Whereby webhook events."""
    start = end - timedelta(minutes=30)
    with session_scope() as session:
        row = Meeting(
            booking_id=booking_id,
            state=state,
            start=start,
            end=end,
            create_at=start - timedelta(minutes=15),
            room_end=end,
            created_at=start - DAY,
            updated_at=end,
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        whereby_id = f"w-{uuid.uuid4().hex[:12]}"
        if room is not None:
            session.add(
                Room(
                    meeting_pk=row.id,
                    tag=uuid.uuid4().hex[:12],
                    name_prefix="/rk",
                    state=room,
                    whereby_id=whereby_id,
                    end_date=end,
                    created_at=start,
                    deleted_at=end if room == RoomState.DELETED else None,
                    due_at=end if room == RoomState.LIVE else None,
                )
            )
            for n in range(webhooks):
                session.add(
                    WebhookEvent(
                        event_id=f"{whereby_id}-{n}",
                        type="room.client.joined",
                        created_at=start,
                        received_at=start,
                        whereby_id=whereby_id,
                        applied_at=start,
                    )
                )
        for n in range(history):
            session.add(History(at=start, booking_id=booking_id, kind="state", action=f"step {n}"))
    return booking_id


def event(booking_id: str, at: datetime, state: DeliveryState = DeliveryState.DELIVERED) -> None:
    """An event for a notify URL (delivered, given up, or pending) and its outbox row."""
    done = state != DeliveryState.PENDING
    with session_scope() as session:
        session.add(
            EventDelivery(
                delivery_id=str(uuid.uuid4()),
                booking_id=booking_id,
                event="room.ready",
                url="https://hooks.example.com/rooms",
                body="{}",
                created_at=at,
                due_at=at,
                pending=not done,
                state=state,
                finished_at=at if done else None,
            )
        )
        session.add(
            Outbox(
                created_at=at,
                booking_id=booking_id,
                task="rooms.deliver_events",
                queue="rooms",
                kwargs={"booking_id": booking_id},
                pending=not done,
                sent_at=at if done else None,
            )
        )


def counts() -> dict[str, int]:
    with session_scope() as session:
        return {
            table: int(session.execute(select(func.count()).select_from(model)).scalar_one())
            for table, model in MODELS.items()
        }


def booking_ids(model: Any) -> set[str]:
    with session_scope() as session:
        return set(session.execute(select(col(model.booking_id)).distinct()).scalars())


def whereby_ids() -> set[str | None]:
    with session_scope() as session:
        return set(session.execute(select(col(WebhookEvent.whereby_id)).distinct()).scalars())


def the_store() -> dict[str, Any]:
    """Everything, to compare before and after: rows per table, by primary key."""
    with session_scope() as session:
        return {
            table: sorted(session.execute(select(col(model.id))).scalars()) for table, model in MODELS.items()
        }


def scenario() -> dict[str, set[str]]:
    """Old finished bookings (to go) beside everything that must stay; returns the ids by fate."""
    gone = {
        meeting("old-ended", MeetingState.ENDED, NOW - 91 * DAY),
        meeting("old-cancelled", MeetingState.CANCELLED, NOW - 200 * DAY),
        meeting("old-failed", MeetingState.FAILED, NOW - 365 * DAY, room=RoomState.ABANDONED),
        meeting("old-no-room", MeetingState.CANCELLED, NOW - 95 * DAY, room=None),
    }
    for booking_id in ("old-ended", "old-cancelled"):
        event(booking_id, NOW - 91 * DAY)
        event(booking_id, NOW - 90 * DAY, DeliveryState.UNDELIVERED)  # kept as long as its booking
    stay = {
        # Live or waiting, however old their times look.
        meeting("live", MeetingState.READY, NOW + 600 * timedelta(seconds=1), room=RoomState.LIVE),
        meeting("scheduled", MeetingState.SCHEDULED, NOW + 30 * DAY, room=None),
        meeting("deleting-long-ago", MeetingState.DELETING, NOW - 120 * DAY, room=RoomState.LIVE),
        meeting("creating-long-ago", MeetingState.CREATING, NOW - 120 * DAY, room=RoomState.PENDING),
        # Finished within the 90 days.
        meeting("recent-ended", MeetingState.ENDED, NOW - 89 * DAY),
        meeting("last-month", MeetingState.ENDED, NOW - 40 * DAY),
        # Finished long ago, but something of it is still in flight.
        meeting("old-cancelled-room-live", MeetingState.CANCELLED, NOW - 100 * DAY, room=RoomState.LIVE),
        meeting("old-event-pending", MeetingState.ENDED, NOW - 100 * DAY),
    }
    event("old-event-pending", NOW - 100 * DAY, DeliveryState.PENDING)
    event("live", NOW - 40 * DAY)  # delivered > 30 days ago: the rows go, the booking stays
    event("live", NOW - 29 * DAY)  # delivered within 30 days: stays
    event("last-month", NOW - 40 * DAY)  # the same for a finished booking within retention
    event("last-month", NOW - 40 * DAY, DeliveryState.UNDELIVERED)  # given up: kept with its booking
    event("feed:team", NOW - 100 * DAY, DeliveryState.UNDELIVERED)  # a feed's event, long given up
    event("feed:other", NOW - 10 * DAY, DeliveryState.UNDELIVERED)  # recently given up: stays
    with session_scope() as session:
        for n, (received, applied) in enumerate(
            [(NOW - 100 * DAY, True), (NOW - 100 * DAY, False), (NOW - 5 * DAY, True)]
        ):
            session.add(
                WebhookEvent(
                    event_id=f"stranger-{n}",
                    type="room.client.left",
                    created_at=received,
                    received_at=received,
                    whereby_id=f"stranger-{n}",
                    applied_at=received if applied else None,
                )
            )
    return {"gone": gone, "stay": stay}


# --------------------------------------------------------------------------------------------


def test_finished_bookings_go_with_their_rows_and_nothing_live_is_touched(retained: str) -> None:
    fates = scenario()
    live_before = _rows_of({"live", "scheduled", "deleting-long-ago", "creating-long-ago"})
    expected = retention.preview(NOW)

    report = retention.prune(NOW)

    assert report.removed == Counter({k: v for k, v in expected.items() if v})
    assert booking_ids(Meeting) == fates["stay"]
    assert booking_ids(History) == fates["stay"]
    # Every row of a pruned booking is gone: rooms, history, events of every state, webhooks.
    for model in (History, Outbox, EventDelivery):
        assert not booking_ids(model) & fates["gone"], model
    with session_scope() as session:
        rooms = session.execute(select(Room, Meeting).join(Meeting, col(Room.meeting_pk) == col(Meeting.id)))
        assert {m.booking_id for _r, m in rooms} == fates["stay"] - {"scheduled"}
    # Live and scheduled bookings: every row exactly as it was.
    assert _rows_of(
        {"live", "scheduled", "deleting-long-ago", "creating-long-ago"}
    ) == _without_old_delivered(live_before)
    # Delivered > 30 days ago went, whatever the booking; given-up ones stay with their booking.
    events = _events()
    assert events["live"] == [("delivered", 29)]
    assert events["last-month"] == [("undelivered", 40)]
    assert events["old-event-pending"] == [("pending", 100)]
    assert "feed:team" not in events and events["feed:other"] == [("undelivered", 10)]
    assert {w for w in whereby_ids() if w and w.startswith("stranger")} == {"stranger-1", "stranger-2"}

    assert report.removed["meeting"] == 4
    assert report.removed["room"] == 3
    assert report.removed["history"] == 12
    assert retention.preview(NOW) == dict.fromkeys(retention.TABLES, 0)
    assert retention.prune(NOW).removed == Counter()  # again: nothing more


def _rows_of(ids: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of these bookings in every table, as tuples of their columns."""
    with session_scope() as session:
        meetings = session.execute(select(Meeting).where(col(Meeting.booking_id).in_(ids))).scalars().all()
        pks = [m.id for m in meetings]
        rooms = session.execute(select(Room).where(col(Room.meeting_pk).in_(pks))).scalars().all()
        hooks = [r.whereby_id for r in rooms]
        found: dict[str, list[tuple[Any, ...]]] = {
            "meeting": sorted((m.id, m.state, m.end, m.updated_at) for m in meetings),
            "room": sorted((r.id, r.state, r.due_at) for r in rooms),
        }
        for name, model, where in (
            ("history", History, col(History.booking_id).in_(ids)),
            ("outbox", Outbox, col(Outbox.booking_id).in_(ids)),
            ("event_delivery", EventDelivery, col(EventDelivery.booking_id).in_(ids)),
            ("webhook_event", WebhookEvent, col(WebhookEvent.whereby_id).in_(hooks)),
        ):
            rows = session.execute(select(model).where(where)).scalars().all()
            found[name] = sorted(
                (
                    r.id,
                    getattr(r, "booking_id", None),
                    getattr(r, "sent_at", None) or getattr(r, "finished_at", None),
                )
                for r in rows
            )
    return found


def _without_old_delivered(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """What retention takes from a live booking: its events delivered more than 30 days ago."""
    old = NOW - 30 * DAY
    kept = dict(rows)
    for name in ("outbox", "event_delivery"):
        kept[name] = [r for r in rows[name] if r[2] is None or r[2] >= old]
    return kept


def _events() -> dict[str, list[tuple[str, int]]]:
    with session_scope() as session:
        found: dict[str, list[tuple[str, int]]] = {}
        for row in session.execute(select(EventDelivery).order_by(col(EventDelivery.id))).scalars():
            found.setdefault(row.booking_id, []).append((row.state, round((NOW - row.created_at) / DAY)))
    return found


def test_the_dry_run_counts_per_table_and_removes_nothing(retained: str) -> None:
    scenario()
    before = the_store()
    preview = retention.preview(NOW)
    assert the_store() == before
    assert preview == {
        "meeting": 4,
        "room": 3,
        "history": 12,
        # 4 of the old bookings and the feed's event given up 100 days ago; of two kept bookings,
        # the events delivered 40 days ago (and every outbox row sent then: the given-up event's
        # outbox row too, which only woke its delivery task).
        "outbox": 4 + 1 + 3,
        "event_delivery": 4 + 1 + 2,
        # 2 per pruned room with a Whereby id (old-failed's abandoned room has one too), and the
        # stranger applied 100 days ago.
        "webhook_event": 6 + 1,
    }
    assert retention.prune(NOW).removed == Counter(preview)


def test_roomkeeper_prune_dry_run_then_prune(retained: str) -> None:
    fates = scenario()
    before = the_store()
    dry = CliRunner().invoke(cli, ["prune", "--dry-run"], env={"COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    assert "would be removed (dry run: nothing was)" in dry.output
    assert _table(dry.output) == retention.preview()
    assert the_store() == before

    done = CliRunner().invoke(cli, ["prune"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert _table(done.output)["meeting"] == 4
    assert booking_ids(Meeting) == fates["stay"]


def _table(output: str) -> dict[str, int]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃| ").split("│")]
        if len(cells) == 2 and cells[0] in retention.TABLES:
            rows[cells[0]] = int(cells[1])
    assert set(rows) == set(retention.TABLES), output
    return rows


def test_batches_are_bounded_and_paused_between(retained: str) -> None:
    for n in range(25):
        meeting(f"old-{n}", MeetingState.ENDED, NOW - 100 * DAY - n * timedelta(minutes=1), history=4)
    for _ in range(30):
        event("live", NOW - 40 * DAY)  # 30 delivery rows and 30 outbox rows to go, in row batches
    meeting("live", MeetingState.READY, NOW + timedelta(minutes=10), room=RoomState.LIVE)
    batches: list[Counter[str]] = []
    sleeps: list[float] = []
    report = retention.prune(
        NOW, batch_meetings=10, batch_rows=7, pause=0.01, sleep=sleeps.append, on_batch=batches.append
    )
    meetings = [b["meeting"] for b in batches if b["meeting"]]
    assert meetings == [10, 10, 5]
    assert all(b["history"] == 4 * b["meeting"] for b in batches if b["meeting"])
    rows = [b["event_delivery"] or b["outbox"] for b in batches if not b["meeting"]]
    assert rows == [7, 7, 7, 7, 2, 7, 7, 7, 7, 2]
    # A pause after each full batch, never shorter than the least pause.
    assert len(sleeps) == 2 + 4 + 4 and min(sleeps) >= 0.01
    assert report.removed["meeting"] == 25 and report.removed["history"] == 100
    assert booking_ids(Meeting) == {"live"}


def bulk(database: str, n: int, history: int = 10) -> None:
    """`n` bookings that ended 100 days ago, with `history` lines each, written in bulk."""
    old = NOW - 100 * DAY
    with store.get_engine(database).begin() as connection:
        for first in range(0, n, 5000):
            ids = [f"bulk-{i}" for i in range(first, min(n, first + 5000))]
            connection.execute(
                Meeting.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {
                        "booking_id": booking_id,
                        "state": MeetingState.ENDED,
                        "start": old,
                        "end": old,
                        "create_at": old,
                        "room_end": old,
                        "room_options": {},
                        "metadata": {},
                        "attempts": 0,
                        "replacing": False,
                        "created_at": old,
                        "updated_at": old,
                    }
                    for booking_id in ids
                ],
            )
            connection.execute(
                History.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {"at": old, "booking_id": booking_id, "kind": "state", "action": "x", "outcome": ""}
                    for booking_id in ids
                    for _ in range(history)
                ],
            )


def test_a_writer_waits_one_batch_at_most_while_a_large_backlog_is_pruned(retained: str) -> None:
    """While 3,000 finished bookings (33,000 rows) are pruned, a small write transaction (the size
    of a room's deletion) runs every 20 ms; none waits much longer than one batch."""
    bulk(retained, 3000)
    meeting("live", MeetingState.READY, NOW + timedelta(minutes=10), room=RoomState.LIVE)
    waits: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            began = time.monotonic()
            with session_scope() as session:
                session.execute(text("UPDATE meeting SET attempts = attempts + 1 WHERE booking_id = 'live'"))
            waits.append(time.monotonic() - began)
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = retention.prune(NOW)
    finally:
        stop.set()
        thread.join()
    assert report.removed["meeting"] == 3000 and report.removed["history"] == 30000
    assert report.batches >= 30  # 100 meetings a batch
    assert len(waits) >= 10
    # One batch (100 meetings, 1,000 history rows) takes tens of milliseconds here.
    assert report.longest_batch < 0.5, report
    assert max(waits) < report.longest_batch + 0.25, (max(waits), report)
    with session_scope() as session:
        assert session.execute(
            select(Meeting.attempts).where(Meeting.booking_id == "live")
        ).scalar_one() == len(waits)


def test_a_pruned_booking_id_sent_again_is_a_new_booking(retained: str) -> None:
    meeting("again", MeetingState.ENDED, NOW - 120 * DAY)
    event("again", NOW - 120 * DAY)
    retention.prune(NOW)
    start = NOW + 2 * DAY
    view = booking.schedule_meeting(
        ScheduleRequest.model_validate(
            {
                "booking_id": "again",
                "start": start.isoformat(),
                "end": (start + timedelta(hours=1)).isoformat(),
            }
        )
    )
    assert view["state"] == "scheduled" and view["room"] is None
    assert view["created_at"] >= NOW.isoformat().replace("+00:00", "")  # a row of its own, made now
    history = [(h.kind, h.action) for h in booking.history("again")]
    assert history == [("state", "booked")]  # none of the old booking's history came back


def test_retention_off_keeps_everything(retained: str) -> None:
    scenario()
    apply_settings(ROOMKEEPER_RETENTION_DAYS="0", ROOMKEEPER_DELIVERED_RETENTION_DAYS="0")
    before = the_store()
    assert retention.preview(NOW) == dict.fromkeys(retention.TABLES, 0)
    assert retention.prune(NOW).removed == Counter()
    assert the_store() == before


def test_shorter_settings_prune_sooner(retained: str) -> None:
    meeting("week-old", MeetingState.ENDED, NOW - 8 * DAY)
    meeting("yesterday", MeetingState.ENDED, NOW - DAY)
    event("yesterday", NOW - 3 * DAY)
    apply_settings(ROOMKEEPER_RETENTION_DAYS="7", ROOMKEEPER_DELIVERED_RETENTION_DAYS="2")
    removed = retention.prune(NOW).removed
    assert booking_ids(Meeting) == {"yesterday"}
    assert removed["meeting"] == 1 and removed["event_delivery"] == 1 and removed["outbox"] == 1


def test_metrics_show_the_backlog_rows_removed_and_the_last_run(retained: str) -> None:
    scenario()
    with TestClient(create_app()) as client:
        before = scrape(client)
        # 4 to go, and 2 finished long ago that wait for something in flight.
        assert value(before, "roomkeeper_prune_backlog_meetings") == 6
        assert value(before, "roomkeeper_pruned_rows_total", table="meeting") == 0
        assert ("roomkeeper_prune_last_run_timestamp_seconds", ()) not in before
        report = retention.prune(NOW)
        after = scrape(client)
    assert value(after, "roomkeeper_prune_backlog_meetings") == 2
    for table in retention.TABLES:
        assert value(after, "roomkeeper_pruned_rows_total", table=table) == report.removed[table], table
    assert time.time() - 60 < value(after, "roomkeeper_prune_last_run_timestamp_seconds") <= time.time()
    assert value(after, "roomkeeper_prune_last_run_rows") == sum(report.removed.values())
    assert 0 < value(after, "roomkeeper_prune_last_run_seconds") < 60


def test_the_beat_task_prunes(retained: str) -> None:
    from tasks.scheduled import prune

    meeting("task-old", MeetingState.CANCELLED, NOW - 100 * DAY)
    assert prune()["meeting"] == 1
    assert booking_ids(Meeting) == set()


def test_finding_what_to_prune_is_a_range_scan_of_an_index(retained: str) -> None:
    """Every query that finds rows to prune reads an index range, never the whole table: its cost
    follows the rows due for pruning, not the rows stored. (On PostgreSQL sequential scans are
    turned off for the check: with a handful of rows the planner would rightly prefer them.)"""
    cut = retention.cutoffs(NOW, get_settings())
    assert cut.bookings is not None
    finders: dict[str, Any] = {
        f"{state} meetings": select(col(Meeting.id))
        .where(retention._prunable(cut.bookings, state))
        .limit(100)
        for state in retention.FINAL
    }
    for name, model, where in (
        ("delivered", EventDelivery, retention._old_delivered(cut)),
        ("sent outbox", Outbox, retention._old_sent_outbox(cut)),
        ("given up, no booking", EventDelivery, retention._orphans_given_up(cut)),
        ("applied webhooks", WebhookEvent, retention._old_applied_webhooks(cut)),
    ):
        assert where is not None
        finders[name] = select(model.id).where(where).limit(500)
    finders["a batch's history"] = select(col(History.id)).where(col(History.booking_id).in_(["a", "b"]))
    finders["a batch's outbox"] = select(col(Outbox.id)).where(col(Outbox.booking_id).in_(["a", "b"]))
    finders["a batch's events"] = select(col(EventDelivery.id)).where(
        col(EventDelivery.booking_id).in_(["a", "b"])
    )
    engine = store.get_engine(retained)
    with engine.connect() as connection:
        sqlite = engine.dialect.name == "sqlite"
        if not sqlite:
            connection.exec_driver_sql("SET enable_seqscan = off")
        for name, query in finders.items():
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            plan = "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + sql))
            if sqlite:
                assert "SCAN " not in plan and "USING" in plan, (name, plan)
            else:
                assert "Seq Scan" not in plan and "Index" in plan, (name, plan)


# --------------------------------------------------------------------------------------------
# Real processes: beat prunes a large backlog while a worker deletes rooms at their end.


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    system = ProcessSystem(
        database, sandbox_server.url, sandbox_server.admin_url, {"ROOMKEEPER_PRUNE_INTERVAL_SECONDS": "1"}
    )
    try:
        yield system
    finally:
        system.stop()


def test_beat_prunes_a_backlog_while_rooms_are_still_deleted_on_time(procs: ProcessSystem) -> None:
    bulk(procs.database_url, 15_000)
    left: list[tuple[datetime, int]] = []  # (when, old bookings still stored), watched all along
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with procs.engine.connect() as connection:
                n = connection.execute(text("SELECT count(*) FROM meeting WHERE booking_id LIKE 'bulk-%'"))
                left.append((datetime.now(UTC), int(n.scalar_one())))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        procs.start_worker()
        procs.start_beat()
        procs.wait_for(lambda: left and left[-1][1] < 15_000, timeout=30)  # the prune has begun
        # Meetings whose ends fall while beat goes on pruning.
        start = later(1.5)
        ends = {f"due-{n}": start + timedelta(seconds=1 + n) for n in range(4)}
        for booking_id, end in ends.items():
            procs.book(booking_id, start, end)
        procs.wait_for(lambda: set(procs.states()) == set(ends), timeout=90)
        procs.wait_for(lambda: all(state == "ended" for state in procs.states().values()), timeout=30)
        procs.wait_for(lambda: left[-1][1] == 0, timeout=60)
    finally:
        stop.set()
        watcher.join(5)

    began = next(moment for moment, n in left if n < 15_000)
    finished = next(moment for moment, n in left if n == 0)
    client = redis.Redis.from_url(procs.redis.url)
    figures = {k.decode(): float(v) for k, v in client.hgetall(metrics.PRUNE_KEY).items()}
    assert figures["removed|meeting"] == 15_000 and figures["removed|history"] == 150_000
    audit = procs.audit()
    deleted = {b: parse(audit.rooms[b][0]["deleted_at"]) for b in ends}
    # The deletions fell while the prune ran (else this test would show nothing) ...
    assert all(moment and began < moment < finished for moment in deleted.values()), (
        began,
        finished,
        deleted,
    )
    # ... and each came at its meeting's end all the same.
    for booking_id, end in ends.items():
        moment = deleted[booking_id]
        assert moment is not None, booking_id
        assert (moment - end).total_seconds() < 1.0, (booking_id, moment - end)
