"""Store scaling: one dispatcher tick and one reconciler pass against 10k, 100k and 1M stored meetings.

What is measured, per database (SQLite in a temporary file, or PostgreSQL in a schema of its own):

* A fresh store is migrated and grown, in place, to each size in turn by bulk SQL generated inside
  the database (INSERT … SELECT over a generated series; well under a minute a million meetings,
  with their other rows). The mix is the
  one the service writes: ~55 % meetings long ended (state ended, due_at NULL, one deleted room
  each with due_at NULL), ~5 % cancelled or failed, ~40 % booked far ahead (state scheduled,
  due_at = their creation instant, days to months away, no room yet), with their history rows
  (about 2.7 a meeting) and the sent events of the meetings that have a notify task. On top of
  that, and the same at every size: `live` meetings whose rooms are live and end hours ahead, and
  `due` rows due right now: half room creations (meetings whose creation time has just passed),
  half deletions (live rooms whose meeting has just ended).
* The Whereby sandbox (worker.devtools.sandbox) runs in this process and holds exactly the rooms the store
  thinks are live (made through its own create call, recorded as room.whereby_id), so the
  reconciler finds nothing to repair and every pass does the same work.
* tick: `dispatch.dispatch_due()` followed by `outbox.flush_outbox()`, as the beat task
  `rooms.dispatch_due` runs them, sending its Celery messages to a real Redis (a queue of this
  benchmark's own, purged after each run). recover: `dispatch.dispatch_due(overdue_only=True)`, the
  2-second recovery pass. reconcile: `reconcile.reconcile()` against the sandbox. Before each timed
  run the due rows are put back to unclaimed, so every run claims and sends the same `due` items;
  each run's dispatched count and the queue's length are checked.
* Each figure is the median of `repeats` runs (min and max beside it), after one untimed warm-up
  run whose SQL statements are captured and EXPLAINed with their real parameters (`plans`), to
  show which index each query uses. Beside each figure, "sql" is the part of it spent inside SQL
  statements (cursor executions; commits excluded): the rest of a tick is mostly sending the
  Celery messages, which costs the due rows by design. PostgreSQL is VACUUM ANALYZEd after each
  growth step (what autovacuum does to a store that grew); SQLite gets no ANALYZE, as the service
  never runs one.

The design says a tick costs the due rows, not the stored ones (due_at is indexed and the
dispatcher range-scans it): the tick and recover columns should stay flat from 10k to 1M; the
reconciler's cost follows the live rooms (Whereby's list), also not the stored meetings. The
outbox flush reads a partial index that holds only the unsent events, so it stays flat even on
tables the planner has no statistics for. (On PostgreSQL the reconciler's whereby_id lookup needs
statistics: on a never-analysed room table the planner scans it sequentially, growing with the
stored rows, until autovacuum's first ANALYZE. Run ANALYZE after a bulk import or a pg_restore.)

    .venv/bin/python -m bench.store_scaling [--database sqlite|postgresql://…]… [--sizes 10000,100000]
                                            [--due 50] [--live 100] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Connection, Engine, create_engine, event, insert, text, update
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel, col

from bench.common import postgres_schema
from worker import store
from worker.devtools.sandbox import SandboxConfig, SandboxServer
from worker.jobs import dispatch, outbox
from worker.jobs import reconcile as reconciler
from worker.runtime import process, resources
from worker.store import deployment
from worker.store.models import Meeting, MeetingState, Room, RoomState, utcnow

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
QUEUE = "bench-store-scaling"
CHUNK = 100_000  # meetings a seeding transaction adds
PUBLIC_URL = "https://sandbox.whereby.invalid"
ROOM_OPTIONS = '{"room_mode": "group", "fields": ["hostRoomUrl"]}'
NOTIFY = '{"task": "bookings.room_event", "queue": "bookings"}'
TABLES = ("meeting", "room", "history", "outbox")
PARTIAL_INDEX = "USING INDEX ix_outbox_unsent"

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Bulk seeding: the SQL each database needs for the same rows.


@dataclass(frozen=True)
class Dialect:
    """The few SQL spellings that differ between SQLite and PostgreSQL."""

    label: str
    series: str  # a CTE s(i) counting from :lo to :hi
    ts: str  # {x} epoch seconds -> the naive UTC timestamp models.UTCDateTime stores
    hex8: str  # {x} integer -> 8 hex digits (a room tag)
    pad9: str  # {x} integer -> 9 decimal digits
    hex32: str  # {x} integer -> 32 hex digits (a room name's random part)
    json: str  # {x} text -> a value for a JSON column

    def f(self, template: str, x: str) -> str:
        return template.format(x=x)


SQLITE = Dialect(
    label="SQLite",
    series="RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i < :hi)",
    # SQLAlchemy's SQLite DATETIME text form, microseconds included, so ranges compare as text.
    ts="(strftime('%Y-%m-%d %H:%M:%S', {x}, 'unixepoch') || '.000000')",
    hex8="printf('%08x', {x})",
    pad9="printf('%09d', {x})",
    hex32="lower(hex(randomblob(16)))",
    json="{x}",
)
POSTGRES = Dialect(
    label="PostgreSQL",
    series="s(i) AS (SELECT generate_series(CAST(:lo AS BIGINT), CAST(:hi AS BIGINT)))",
    ts="(to_timestamp({x}) AT TIME ZONE 'UTC')",
    hex8="lpad(to_hex({x}), 8, '0')",
    pad9="lpad(CAST({x} AS TEXT), 9, '0')",
    hex32="md5(CAST({x} AS TEXT))",
    json="CAST({x} AS JSON)",
)

MEETING_COLUMNS = (
    'id, booking_id, state, start, "end", create_at, room_end, room_options, notify, metadata, room_id, '
    "due_at, attempts, replacing, claim_token, claim_until, last_error, created_at, "
    "updated_at"
)
ROOM_COLUMNS = (
    "id, meeting_pk, tag, name_prefix, state, whereby_id, room_name, room_url, host_room_url, "
    "viewer_room_url, end_date, due_at, retired_reason, attempts, claim_token, "
    "claim_until, last_error, created_at, ready_at, deleted_at"
)


def seed_statements(d: Dialect) -> list[tuple[str, str]]:
    """(what, SQL) for one chunk of meetings :lo..:hi, ids and times derived from i and :base.

    By i % 100: 0-54 ended (one deleted room each; room_id NULL again, as a deletion leaves it),
    55-58 cancelled before their room, 59 failed, 60-99 booked 1 to 91 days ahead. Times are
    spread by a multiplicative scramble of i, so due_at order is unrelated to id order, as with
    real bookings.
    """
    length = "(1800 + 900 * (i % 3))"  # 30, 45 or 60 minutes
    meta = d.f(d.json, "CASE WHEN i % 3 = 0 THEN '{}' ELSE '{\"customer\": \"c-' || (i % 5000) || '\"}' END")
    options, notify = d.f(d.json, f"'{ROOM_OPTIONS}'"), d.f(d.json, f"'{NOTIFY}'")
    common = (
        f"'booking-' || {d.f(d.pad9, 'i')}, @STATE@, {d.f(d.ts, 'st')}, {d.f(d.ts, f'st + {length}')}, "
        f"{d.f(d.ts, 'st - 900')}, {d.f(d.ts, f'st + {length}')}, {options}, "
        f"CASE WHEN i % 2 = 0 THEN {notify} END, {meta}"
    )
    terminal = "CASE WHEN b < 55 THEN 'ended' WHEN b < 59 THEN 'cancelled' ELSE 'failed' END"
    ended = f"""
        WITH {d.series}, t AS (
            SELECT i, i % 100 AS b, CAST(:base AS BIGINT) - 86400 - (i * 7919) % 31536000 AS st
            FROM s WHERE i % 100 < 60
        )
        INSERT INTO meeting ({MEETING_COLUMNS})
        SELECT i, {common.replace("@STATE@", terminal)},
            NULL, NULL, CASE WHEN b < 55 THEN 1 WHEN b = 59 THEN 8 ELSE 0 END,
            FALSE, NULL, NULL,
            CASE WHEN b = 59 THEN 'ServerError: 503 Service Unavailable (gave up after 8 attempts)' END,
            {d.f(d.ts, "st - 900 - 86400 * (1 + i % 14)")}, {d.f(d.ts, f"st + {length} + 1")}
        FROM t
    """
    booked = f"""
        WITH {d.series}, t AS (
            SELECT i, CAST(:base AS BIGINT) + 86400 + (i * 7919) % 7776000 AS st,
                   CAST(:base AS BIGINT) - 60 - (i * 104729) % 2592000 AS made
            FROM s WHERE i % 100 >= 60
        )
        INSERT INTO meeting ({MEETING_COLUMNS})
        SELECT i, {common.replace("@STATE@", "'scheduled'")},
            NULL, {d.f(d.ts, "st - 900")}, 0, FALSE, NULL, NULL, NULL,
            {d.f(d.ts, "made")}, {d.f(d.ts, "made")}
        FROM t
    """
    rooms = f"""
        INSERT INTO room ({ROOM_COLUMNS})
        SELECT id, id, tag, 'rk-' || tag || '-', 'deleted', CAST(10000000000 + id AS TEXT),
            '/rk-' || tag || '-' || sfx, '{PUBLIC_URL}/rk-' || tag || '-' || sfx,
            '{PUBLIC_URL}/rk-' || tag || '-' || sfx || '?roomKey=' || sfx, NULL,
            room_end, NULL, NULL, 0, NULL, NULL, NULL, create_at, create_at, room_end
        FROM (
            SELECT id, room_end, create_at, {d.f(d.hex8, "id")} AS tag, {d.f(d.hex32, "id")} AS sfx
            FROM meeting WHERE id BETWEEN :lo AND :hi AND state = 'ended'
        ) m
    """
    history = """
        WITH h(k, kind, action, outcome) AS (VALUES
            (0, 'state', 'booked', 'for its start'),
            (1, 'whereby', 'POST /meetings', '201 in 0.142s'),
            (2, 'state', 'creating -> ready', 'room made'),
            (3, 'state', 'deleting -> ended', 'room deleted')
        )
        INSERT INTO history (at, booking_id, kind, action, outcome)
        SELECT CASE WHEN h.k = 0 THEN m.created_at WHEN h.k < 3 THEN m.create_at ELSE m.room_end END,
            m.booking_id, h.kind, h.action, h.outcome
        FROM meeting m JOIN h ON h.k = 0 OR m.state = 'ended'
        WHERE m.id BETWEEN :lo AND :hi
        ORDER BY m.id, h.k
    """
    kwargs = d.f(
        d.json,
        '\'{"event": "\' || e.event || \'", "booking_id": "\' || m.booking_id || '
        '\'", "meeting": {"booking_id": "\' || m.booking_id || '
        '\'", "state": "ended", "room": null, "metadata": {}, "last_error": null}}\'',
    )
    outbox = f"""
        WITH e(k, event) AS (VALUES (0, 'room.ready'), (1, 'room.deleted'))
        INSERT INTO outbox (created_at, booking_id, task, queue, kwargs, sent_at, pending, claim_until)
        SELECT CASE WHEN e.k = 0 THEN m.create_at ELSE m.room_end END, m.booking_id,
            'bookings.room_event', 'bookings', {kwargs},
            CASE WHEN e.k = 0 THEN m.create_at ELSE m.room_end END, FALSE, NULL
        FROM meeting m JOIN e ON TRUE
        WHERE m.id BETWEEN :lo AND :hi AND m.state = 'ended' AND m.id % 2 = 0
        ORDER BY m.id, e.k
    """
    return [
        ("ended meetings", ended),
        ("booked meetings", booked),
        ("rooms", rooms),
        ("history", history),
        ("outbox", outbox),
    ]


@dataclass
class Fixed:
    """The rows every size shares: live meetings and the due work. Ids 1..total."""

    live: int
    due_creations: int
    due_deletions: int

    @property
    def total(self) -> int:
        return self.live + self.due_creations + self.due_deletions

    @property
    def due(self) -> int:
        return self.due_creations + self.due_deletions

    @property
    def live_rooms(self) -> int:
        return self.live + self.due_deletions

    @property
    def creation_ids(self) -> tuple[int, int]:
        first = self.live + self.due_deletions + 1
        return first, first + self.due_creations - 1

    @property
    def deletion_ids(self) -> tuple[int, int]:
        return self.live + 1, self.live + self.due_deletions


def seed_fixed(engine: Engine, server: SandboxServer, fixed: Fixed) -> None:
    """Live meetings with rooms on the sandbox, and the due rows, through the models' own types."""
    now = utcnow()
    meetings: list[dict[str, Any]] = []
    rooms: list[dict[str, Any]] = []
    for pk in range(1, fixed.total + 1):
        if pk <= fixed.live:  # in progress, ending 3 to 8 hours from now
            start = now - timedelta(minutes=10)
            end = now + timedelta(hours=3 + pk % 6)
        elif pk <= fixed.live + fixed.due_deletions:  # ended seconds ago: the room is due to go
            end = now - timedelta(seconds=1 + pk % 30)
            start = end - timedelta(minutes=30)
        else:  # starts in 15 minutes: its room is due to be made now
            start = now + timedelta(minutes=15) - timedelta(seconds=1 + pk % 10)
            end = start + timedelta(minutes=30)
        create_at, room_end = start - timedelta(minutes=15), end
        has_room = pk <= fixed.live + fixed.due_deletions
        meetings.append(
            {
                "id": pk,
                "booking_id": f"fixed-{pk:06d}",
                "state": MeetingState.READY if has_room else MeetingState.SCHEDULED,
                "start": start,
                "end": end,
                "create_at": create_at,
                "room_end": room_end,
                "room_options": json.loads(ROOM_OPTIONS),
                "notify": json.loads(NOTIFY),
                "metadata": {},
                "room_id": pk if has_room else None,
                "due_at": None if has_room else create_at,
                "attempts": 1 if has_room else 0,
                "replacing": False,
                "created_at": now - timedelta(days=2),
                "updated_at": create_at if has_room else now - timedelta(days=2),
            }
        )
        if has_room:
            # "z" is no hex digit: these tags never meet the bulk rows' hex tags.
            tag = "z" + deployment.new_tag()[1:]
            prefix = deployment.room_name_prefix("rk", deployment.identity(), tag, None)
            made = _sandbox_room(server, prefix, max(room_end, now + timedelta(hours=1)))
            rooms.append(
                {
                    "id": pk,
                    "meeting_pk": pk,
                    "tag": tag,
                    "name_prefix": prefix,
                    "state": RoomState.LIVE,
                    "whereby_id": made["meetingId"],
                    "room_name": made["roomName"],
                    "room_url": made["roomUrl"],
                    "host_room_url": made.get("hostRoomUrl"),
                    "end_date": room_end,
                    "due_at": room_end,
                    "attempts": 0,
                    # Long enough ago that the reconciler checks it is still on Whereby.
                    "created_at": create_at,
                    "ready_at": now - timedelta(minutes=11),
                }
            )
    with engine.begin() as connection:
        connection.execute(insert(SQLModel.metadata.tables["meeting"]), meetings)
        connection.execute(insert(SQLModel.metadata.tables["room"]), rooms)


def _sandbox_room(server: SandboxServer, prefix: str, end: datetime) -> dict[str, Any]:
    body = {
        "endDate": end.isoformat(),
        "roomNamePrefix": prefix,
        "roomMode": "group",
        "fields": ["hostRoomUrl"],
    }
    reply = server.sandbox.handle(
        "POST", "/v1/meetings", [], f"Bearer {server.sandbox.config.api_key}", json.dumps(body).encode()
    )
    if reply.status != 201:
        raise RuntimeError(f"the sandbox refused a room: {reply.status} {reply.body}")
    made: dict[str, Any] = reply.body
    return made


def seed_bulk(engine: Engine, d: Dialect, first: int, last: int, base: int, log: Log) -> None:
    """Meetings first..last (and their rooms, history and events), in transactions of CHUNK."""
    statements = [(what, text(sql)) for what, sql in seed_statements(d)]
    for lo in range(first, last + 1, CHUNK):
        hi = min(lo + CHUNK - 1, last)
        with engine.begin() as connection:
            for _what, statement in statements:
                connection.execute(statement, {"lo": lo, "hi": hi, "base": base})
        log(f"  seeded meetings {lo:,}..{hi:,}")


def _seed_engine(url: str) -> Engine:
    """A connection of its own for bulk loading (a large page cache on SQLite, plain transactions)."""
    engine = create_engine(store.sqlalchemy_url(url))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA cache_size=-512000")
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.close()

    return engine


def after_growth(engine: Engine, d: Dialect) -> None:
    """Settle the store after a growth step: what autovacuum (PostgreSQL) or nothing (SQLite) does."""
    if d is POSTGRES:
        with engine.connect() as connection:
            for table in ("meeting", "room"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
            connection.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for table in TABLES:
                connection.exec_driver_sql(f"VACUUM ANALYZE {table}")
    else:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


# --------------------------------------------------------------------------------------------
# Plans: the statements the service really ran, EXPLAINed with their real parameters.


class Recorder:
    def __init__(self) -> None:
        self.phase: str | None = None
        self.seen: dict[tuple[str, str], Any] = {}

    def __call__(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        if self.phase is None or executemany:
            return
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("SELECT", "UPDATE") and re.search(r"\b(FROM|UPDATE) (meeting|room|outbox)\b", statement):
            self.seen.setdefault((self.phase, statement), parameters)


@contextmanager
def recording(engine: Engine, recorder: Recorder) -> Iterator[None]:
    event.listen(engine, "before_cursor_execute", recorder)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", recorder)


def _label(statement: str) -> str:
    flat = " ".join(statement.split())
    flat = re.sub(r"\b(meeting|room|outbox)\.", "", flat)
    flat = re.sub(r"%\(\w+\)s(::(INTEGER|VARCHAR|BOOLEAN|TIMESTAMP WITHOUT TIME ZONE))?", "?", flat)
    flat = re.sub(r"\?(, \?)+", "…", flat)
    flat = re.sub(r"SELECT .*? FROM", "SELECT … FROM", flat, count=1)
    flat = re.sub(r" SET .*? WHERE", " SET … WHERE", flat, count=1)
    return flat[:150] + ("…" if len(flat) > 150 else "")


def explain(engine: Engine, recorder: Recorder) -> list[dict[str, Any]]:
    plans = []
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        for (phase, statement), parameters in recorder.seen.items():
            if sqlite:
                rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
                lines = [str(row[3]) for row in rows]
                # Scanning a partial index reads only the rows it holds (the unsent events).
                full = [
                    line
                    for line in lines
                    if re.match(r"SCAN (meeting|room|outbox|history)\b", line) and PARTIAL_INDEX not in line
                ]
            else:
                rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
                lines = [str(row[0]) for row in rows]
                full = [line for line in lines if "Seq Scan on" in line]
            plans.append({"phase": phase, "sql": _label(statement), "plan": lines, "full_scan": bool(full)})
        connection.rollback()
    return plans


def index_use(plans: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether each table's due-work query goes through its due_at index."""
    found = {}
    for table in ("meeting", "room"):
        claims = [p for p in plans if p["phase"] != "reconcile" and f"FROM {table} WHERE due_at" in p["sql"]]
        found[table] = bool(claims) and all(
            any(f"ix_{table}_due_at" in line for line in p["plan"]) for p in claims
        )
    return found


# --------------------------------------------------------------------------------------------
# The run.


def _apply_env(env: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables and make the service read them; returns the old ones."""
    previous = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    process.start()
    resources.reset()
    return previous


def _point_celery_at(broker_url: str, backend_url: str) -> tuple[str, str]:
    """The Celery app reads its broker when first imported: one imported earlier (with other
    settings) is moved to this broker. Returns the URLs it had."""
    from worker.runtime.app import app

    previous = (str(app.conf.broker_url), str(app.conf.result_backend))
    if previous != (broker_url, backend_url):
        app.conf.broker_url = broker_url
        app.conf.result_backend = backend_url
        if app._pool is not None:
            app._pool.force_close_all()
            app._pool = None
        app.amqp._producer_pool = None
    return previous


@contextmanager
def fresh_store(database_url: str) -> Iterator[tuple[str, Dialect, str]]:
    """(URL of a new, empty store, its dialect, a description); removed afterwards."""
    if database_url.startswith("sqlite"):
        path = make_url(database_url).database if database_url.startswith("sqlite:///") else None
        with tempfile.TemporaryDirectory(prefix="store-scaling-") as tmp:
            file = Path(path) if path else Path(tmp) / "store.db"
            if file.exists():
                raise SystemExit(f"{file} exists: the benchmark needs a fresh store")
            try:
                yield f"sqlite:///{file}", SQLITE, f"SQLite ({file})"
            finally:
                store.dispose_engines()
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{file}{suffix}").unlink(missing_ok=True)
        return
    schema = f"bench_scaling_{os.getpid()}"
    url, drop = postgres_schema(database_url, schema)
    try:
        yield url, POSTGRES, f"PostgreSQL (schema {schema})"
    finally:
        drop()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


class SqlClock:
    """Adds up the time the database spends on the statements sent while it is running."""

    def __init__(self) -> None:
        self.running = False
        self.total = 0.0
        self._started = 0.0

    def before(self, *_: Any) -> None:
        self._started = time.perf_counter()

    def after(self, *_: Any) -> None:
        if self.running:
            self.total += time.perf_counter() - self._started


class Bench:
    """The timed operations, on a store whose fixed rows are `fixed`."""

    def __init__(self, fixed: Fixed, broker: redis.Redis) -> None:
        self.fixed = fixed
        self.broker = broker
        self.recorder: Recorder | None = None
        self.clock = SqlClock()
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time the block and the SQL in it (and, on a recorded run, capture that SQL)."""
        if self.recorder is not None:
            self.recorder.phase = phase
        self.clock.total, self.clock.running = 0.0, True
        started = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - started
            self.clock.running = False
            self.times.setdefault(phase, []).append(took * 1000)
            self.times.setdefault(f"{phase}_sql", []).append(self.clock.total * 1000)
            if self.recorder is not None:
                self.recorder.phase = None

    def release_due(self) -> None:
        """Put the due rows back to unclaimed, as before the tick that would first see them."""
        with store.session_scope() as session:
            for model, (first, last) in ((Meeting, self.fixed.creation_ids), (Room, self.fixed.deletion_ids)):
                session.execute(
                    update(model)
                    .where(col(model.id).between(first, last))
                    .values(claim_token=None, claim_until=None)
                )
        self.broker.delete(QUEUE)

    def tick(self) -> int:
        """One beat tick, as the rooms.dispatch_due task runs it; returns the items it sent."""
        self.release_due()
        with self.timed("tick"):
            counts = dispatch.dispatch_due()
            outbox.flush_outbox()
        self._check(counts, "tick")
        return counts["create"] + counts["delete"]

    def recover(self) -> None:
        self.release_due()
        with self.timed("recover"):
            counts = dispatch.dispatch_due(overdue_only=True)
        self._check(counts, "recovery pass")

    def reconcile(self) -> None:
        with self.timed("reconcile"):
            counts = reconciler.reconcile()
        repairs = {k: v for k, v in counts.items() if k != "listed" and v}
        if repairs or counts["listed"] != self.fixed.live_rooms:
            raise RuntimeError(f"the reconciler saw a difference it should not: {counts}")

    def _check(self, counts: dict[str, int], what: str) -> None:
        expected = {"create": self.fixed.due_creations, "delete": self.fixed.due_deletions}
        queued = int(self.broker.llen(QUEUE))
        if counts != expected or queued != self.fixed.due:
            raise RuntimeError(f"{what} dispatched {counts} ({queued} queued), expected {expected}")

    def measure(self, repeats: int, recorder: Recorder) -> dict[str, Any]:
        engine = store.get_engine()
        event.listen(engine, "before_cursor_execute", self.clock.before)
        event.listen(engine, "after_cursor_execute", self.clock.after)
        try:
            # One untimed warm-up (connections, Celery's producer), its SQL captured for EXPLAIN.
            self.recorder = recorder
            with recording(engine, recorder):
                self.tick()
                self.recover()
                self.reconcile()
            self.recorder = None
            self.times = {}
            dispatched = 0
            for _ in range(repeats):
                dispatched = self.tick()
                self.recover()
                self.reconcile()
            self.release_due()
        finally:
            event.remove(engine, "before_cursor_execute", self.clock.before)
            event.remove(engine, "after_cursor_execute", self.clock.after)
        with store.session_scope() as session:
            live = session.execute(
                text("SELECT count(*) FROM room WHERE state = :live"), {"live": str(RoomState.LIVE)}
            ).scalar_one()
        return {
            **{f"{phase}_ms": _summary(values) for phase, values in self.times.items()},
            "due_dispatched": dispatched,
            "live_rooms": int(live),
        }


def run(
    database_url: str,
    sizes: Sequence[int] = DEFAULT_SIZES,
    due: int = 50,
    repeats: int = 5,
    redis_url: str = DEFAULT_REDIS_URL,
    log: Log = print,
    live: int = 100,
) -> dict[str, Any]:
    """Measure one tick, one recovery pass and one reconciler pass at each store size.

    `database_url`: "sqlite" (a temporary file), "sqlite:///new-file.db", or a postgresql:// URL
    of a server where a schema of its own is made and dropped. `sizes`: meetings stored, ascending
    (the store grows in place from one to the next). Returns a JSON-serialisable report.
    """
    sizes = sorted(sizes)
    fixed = Fixed(live=live, due_creations=due // 2, due_deletions=due - due // 2)
    if not sizes or sizes[0] <= fixed.total:
        raise ValueError(f"every size must exceed the {fixed.total} live and due meetings")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    wall = time.perf_counter()
    broker = redis.Redis.from_url(redis_url)
    server = SandboxServer(SandboxConfig()).start()
    previous: dict[str, str | None] = {}
    celery_before: tuple[str, str] | None = None
    report: dict[str, Any] = {}
    try:
        with fresh_store(database_url) as (url, dialect, described):
            log(
                f"store scaling on {described}: sizes {', '.join(f'{s:,}' for s in sizes)}, "
                f"{fixed.due} due rows, {fixed.live_rooms} live rooms, {repeats} repeats"
            )
            previous = _apply_env(
                {
                    "ROOMKEEPER_DATABASE_URL": url,
                    "ROOMKEEPER_BROKER_URL": redis_url,
                    "ROOMKEEPER_RESULT_BACKEND": redis_url,
                    "ROOMKEEPER_QUEUE": QUEUE,
                    "ROOMKEEPER_API_POINTS_PER_MINUTE": "0",  # no budget: nothing but the work itself
                    "WHEREBY_API_URL": server.url,
                    "WHEREBY_API_KEY": None,  # the sandbox's own key
                }
            )
            celery_before = _point_celery_at(redis_url, redis_url)
            store.migrate(url)
            seeder = _seed_engine(url)
            seed_fixed(seeder, server, fixed)
            bench = Bench(fixed, broker)
            base = int(time.time())
            stored = fixed.total
            rows: list[dict[str, Any]] = []
            recorder = Recorder()
            for size in sizes:
                started = time.perf_counter()
                seed_bulk(seeder, dialect, stored + 1, size, base, log)
                seeded = time.perf_counter() - started
                started = time.perf_counter()
                after_growth(seeder, dialect)
                settled = time.perf_counter() - started
                stored = size
                log(f"  {size:,} meetings stored: seeded in {seeded:.1f} s, settled in {settled:.1f} s")
                recorder = Recorder()
                measured = bench.measure(repeats, recorder)
                plans = explain(store.get_engine(), recorder)
                row = {
                    "stored": size,
                    "seed_s": round(seeded, 2),
                    "settle_s": round(settled, 2),
                    **measured,
                    "full_scans": sorted({p["sql"] for p in plans if p["full_scan"]}),
                    "due_at_index": index_use(plans),
                }
                rows.append(row)
                log(
                    f"  tick {row['tick_ms']['median']:.1f} ms, "
                    f"recover {row['recover_ms']['median']:.1f} ms, "
                    f"reconcile {row['reconcile_ms']['median']:.1f} ms (medians of {repeats})"
                )
            seeder.dispose()
            counts = _table_counts(store.get_engine())
            report = {
                "database": dialect.label,
                "due_rows": fixed.due,
                "live_rooms": fixed.live_rooms,
                "repeats": repeats,
                "rows": rows,
                "table_rows_at_largest": counts,
                "plans": {"stored": sizes[-1], "due_at_index": index_use(plans), "statements": plans},
                "seed_total_s": round(sum(r["seed_s"] for r in rows), 1),
            }
    finally:
        _apply_env(previous)
        if celery_before is not None:
            _point_celery_at(*celery_before)
        server.stop()
        with suppress(redis.RedisError):
            # The queue, kombu's bindings for it, and the budget keys reconcile's calls touched.
            leftovers = [
                *broker.scan_iter(match=f"*{QUEUE}*"),
                *broker.scan_iter(match="roomkeeper:budget:*"),
            ]
            if leftovers:
                broker.delete(*leftovers)
        broker.close()
    report["wall_s"] = round(time.perf_counter() - wall, 1)
    return report


def _table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {table: _count(connection, table) for table in TABLES}


def _count(connection: Connection, table: str) -> int:
    return int(connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


# --------------------------------------------------------------------------------------------
# The command line.


def table(report: dict[str, Any]) -> str:
    """The report as a small text table: each cell is the median, min-max, and the SQL's share."""

    def cell(row: dict[str, Any], phase: str) -> str:
        whole, sql = row[f"{phase}_ms"], row[f"{phase}_sql_ms"]
        return f"{whole['median']:6.1f} ({whole['min']:.1f}-{whole['max']:.1f}) sql {sql['median']:5.1f}"

    lines = [
        f"{report['database']}: {report['due_rows']} due rows, {report['live_rooms']} live rooms; "
        f"ms, median of {report['repeats']} (min-max), and the median time inside SQL; "
        f"run took {report['wall_s']:.0f} s",
        f"{'stored':>10} {'seed s':>7}  {'tick':<30} {'recover':<30} {'reconcile':<30} {'sent':>4} index",
    ]
    for row in report["rows"]:
        index = "due_at" if all(row["due_at_index"].values()) else "NOT due_at"
        lines.append(
            f"{row['stored']:>10,} {row['seed_s']:>7.1f}  {cell(row, 'tick'):<30} {cell(row, 'recover'):<30} "
            f"{cell(row, 'reconcile'):<30} {row['due_dispatched']:>4} {index}"
        )
        for sql in row["full_scans"]:
            lines.append(f"{'':>10} full scan: {sql}")
    return "\n".join(lines)


def _postgres_answers(url: str) -> str | None:
    try:
        with store.get_engine(url).connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        store.dispose_engines()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store_scaling", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--database",
        action="append",
        help="sqlite, sqlite:///new.db or postgresql://… (repeatable; default: sqlite, and "
        f"{DEFAULT_POSTGRES_URL} if it answers)",
    )
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES), help="meetings stored")
    parser.add_argument("--due", type=int, default=50, help="rows due now: half creations, half deletions")
    parser.add_argument("--live", type=int, default=100, help="live rooms besides the due deletions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis", default=DEFAULT_REDIS_URL, help="broker for the dispatched messages")
    parser.add_argument("--json", help="write the reports here as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    databases = args.database
    if not databases:
        databases = ["sqlite"]
        reason = _postgres_answers(DEFAULT_POSTGRES_URL)
        if reason is None:
            databases.append(DEFAULT_POSTGRES_URL)
        else:
            print(f"PostgreSQL skipped: {DEFAULT_POSTGRES_URL} does not answer ({reason})")
    reports = []
    for database in databases:
        report = run(
            database, sizes, due=args.due, repeats=args.repeats, redis_url=args.redis, live=args.live
        )
        reports.append(report)
        print()
        print(table(report), flush=True)
        print()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
        print(f"report written to {args.json}")
    if len(reports) > 1:
        print("summary:")
        for report in reports:
            print(table(report))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
