"""Operational metrics (CONTRACT §4.1): recorded by workers into Redis, read by any `web` process.

Workers count their Whereby calls and deletion lags into two Redis hashes on the broker, so every
`web` process (stateless, as many as you like) exports the same figures without Prometheus's
multiprocess mode. Everything else is read at scrape time: a few aggregate queries over the store
and the shared point budget's window. Recording never raises: a metric is not worth a lost room.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Connection, Engine, case, create_engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlmodel import col

from config.settings import get_settings
from worker import budget, runtime, store, whereby
from worker.models import Meeting, MeetingState, Room, RoomState, utcnow

log = logging.getLogger(__name__)

CALLS_KEY = "roomkeeper:metrics:whereby-calls"  # field "operation|status" -> count
LAG_KEY = "roomkeeper:metrics:deletion-lag"  # field per bucket bound, "sum" and "count"
# budget.Budget's own keys (a test keeps them in step).
BUDGET_WINDOW_KEY = "roomkeeper:budget:window"
BUDGET_PAUSED_KEY = "roomkeeper:budget:paused"
# Deletions are due to the second; most land within a second, a 429 or an outage pushes them out.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)
# How long a check or a scrape may wait for the database or Redis.
TIMEOUT_SECONDS = 2.0


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(value)


# --------------------------------------------------------------------------------------------
# Per-process connections: one Redis client (recording and reading) and one read-only engine.

_lock = threading.Lock()
_redis: redis.Redis | None = None
_engine: Engine | None = None


def _client() -> redis.Redis:
    global _redis
    with _lock:
        if _redis is None:
            _redis = redis.Redis.from_url(
                get_settings().broker_url,
                socket_timeout=TIMEOUT_SECONDS,
                socket_connect_timeout=TIMEOUT_SECONDS,
                # One try: a worker's task must not wait out redis-py's retries for a metric, and
                # a readiness check wants the answer of now.
                retry=Retry(NoBackoff(), 0),
            )
        return _redis


def _read_engine() -> Engine:
    """An engine for reads with short timeouts, apart from the workers' own.

    The store's SQLite engine takes the write lock at BEGIN (see store.py): a scrape or a readiness
    check must not queue behind writers for that, and on PostgreSQL neither may wait for minutes on
    an unreachable server.
    """
    global _engine
    with _lock:
        if _engine is None:
            url = store.sqlalchemy_url(get_settings().database_url)
            if url.startswith("sqlite"):
                _engine = create_engine(
                    url, connect_args={"timeout": TIMEOUT_SECONDS, "check_same_thread": False}
                )

                @event.listens_for(_engine, "connect")
                def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                    dbapi_connection.isolation_level = None  # plain reads, no BEGIN: WAL readers never wait

            else:
                seconds = math.ceil(TIMEOUT_SECONDS)
                # Added to the URL's own options (a search_path, say), which connect_args would replace.
                options = make_url(url).query.get("options") or ""
                if not isinstance(options, str):
                    options = " ".join(options)
                _engine = create_engine(
                    url,
                    pool_pre_ping=True,
                    pool_size=2,
                    max_overflow=2,
                    pool_timeout=TIMEOUT_SECONDS,
                    connect_args={
                        "connect_timeout": seconds,
                        "options": f"{options} -c statement_timeout={seconds * 1000}".strip(),
                    },
                )
        return _engine


@runtime.on_reset("metrics connections")
def _reset() -> None:
    global _redis, _engine, _lock
    # Dropped, not closed: a forked child must not shut what its parent still uses.
    _redis, _engine = None, None
    _lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Recording, in the workers.


def operation(call: whereby.CallRecord) -> str:
    """create / get / list / delete / insights, from the call's method and path."""
    if call.path.startswith("/insights"):
        return "insights"
    if call.path.startswith("/meetings"):
        if call.method == "POST":
            return "create"
        if call.method == "DELETE":
            return "delete"
        if call.method == "GET":
            return "get" if call.path.startswith("/meetings/") else "list"
    return call.method.lower()


def outcome(call: whereby.CallRecord) -> str:
    """The HTTP status Whereby answered, else the error class (APIConnectionError, ...)."""
    if call.status is not None:
        return str(call.status)
    return call.error or "error"


def record_calls(calls: Iterable[whereby.CallRecord]) -> None:
    """Count Whereby calls by operation and status (one Redis round trip; never raises)."""
    try:
        counts = Counter(f"{operation(call)}|{outcome(call)}" for call in calls)
        if not counts:
            return
        pipe = _client().pipeline(transaction=False)
        for field, n in counts.items():
            pipe.hincrby(CALLS_KEY, field, n)
        pipe.execute()
    except Exception as exc:
        log.debug("Whereby calls not counted: %s", type(exc).__name__)


def observe_deletion_lag(seconds: float) -> None:
    """Record how late a room's deletion was against its due instant (one round trip; never raises)."""
    try:
        seconds = max(0.0, float(seconds))
        bucket = next(b for b in LAG_BUCKETS if seconds <= b)
        pipe = _client().pipeline(transaction=True)
        pipe.hincrby(LAG_KEY, _bound(bucket), 1)
        pipe.hincrbyfloat(LAG_KEY, "sum", seconds)
        pipe.hincrby(LAG_KEY, "count", 1)
        pipe.execute()
    except Exception as exc:
        log.debug("deletion lag not recorded: %s", type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Health checks and reads, in `web`.


def describe(error: BaseException) -> str:
    """One line about a failure for an HTTP answer or a log: no URL, password or secret in it."""
    cause = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's error
    first = (str(cause).strip().splitlines() or [""])[0]
    settings = get_settings()
    for url in (settings.database_url, settings.broker_url, settings.backend_url):
        first = first.replace(url, "[url]")
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            first = first.replace(password, "[redacted]")
    first = first[:200]
    name = type(cause).__name__
    return f"{name}: {first}" if first else name


def _connect() -> Connection:
    """A connection for reads. A SQLite file that is not there is an error, not created empty."""
    url = store.sqlalchemy_url(get_settings().database_url)
    if url.startswith("sqlite"):
        database = make_url(url).database or ":memory:"
        on_disk = database != ":memory:" and not database.startswith("file:")
        if on_disk and not Path(database).exists():
            raise FileNotFoundError("no database file (run `roomkeeper migrate`)")
    return _read_engine().connect()


def check_database() -> None:
    """Raise unless the store answers a query on the migrated schema."""
    with _connect() as connection:
        connection.execute(text("SELECT 1"))
        connection.execute(select(col(Meeting.id)).limit(1))  # a store that was never migrated is not ready


def check_redis() -> None:
    """Raise unless the broker answers PING."""
    if not _client().ping():
        raise redis.ConnectionError("no PONG")


# The share of the 60 s window spent so far, and how long a pause (after a 429 or 401) still
# holds every worker back, on Redis's own clock as budget.py keeps them.
_BUDGET_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local used = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')) do
  used = used + tonumber(string.match(member, ':(%d+)$'))
end
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
return {used, math.max(0, paused - now)}
"""


@dataclass
class StoreFigures:
    meetings: dict[str, int]
    rooms_live: int
    rooms_overrunning: int
    oldest_overdue: float


@dataclass
class RedisFigures:
    calls: dict[tuple[str, str], int]
    lag: dict[str, float]
    points_spent: int
    paused_ms: int


def read_store(now: datetime | None = None) -> StoreFigures:
    """Two aggregate queries: meetings by state (over the state index) and the live rooms."""
    now = now or utcnow()
    meetings = {state.value: 0 for state in MeetingState}
    live = col(Room.state) == RoomState.LIVE
    with _connect() as connection:
        for state, count in connection.execute(
            select(col(Meeting.state), func.count()).group_by(col(Meeting.state))
        ):
            meetings[str(state)] = int(count)
        row = connection.execute(
            select(
                func.count(),
                func.count(col(Room.overrun_since)),
                func.min(case((col(Room.due_at) < now, col(Room.due_at)))),
            ).where(live)
        ).one()
    oldest_due: datetime | None = row[2]
    overdue = max(0.0, (now - oldest_due).total_seconds()) if oldest_due is not None else 0.0
    return StoreFigures(meetings, int(row[0]), int(row[1]), overdue)


def read_redis() -> RedisFigures:
    """The workers' counters and the point budget's window, in one round trip."""
    client = _client()
    script = client.register_script(_BUDGET_READ)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(CALLS_KEY)
    pipe.hgetall(LAG_KEY)
    script(keys=[BUDGET_WINDOW_KEY, BUDGET_PAUSED_KEY], args=[budget.WINDOW_MS], client=pipe)
    raw_calls, raw_lag, (spent, paused_ms) = pipe.execute()
    calls: dict[tuple[str, str], int] = {}
    for field, value in raw_calls.items():
        op, _, status = field.decode().partition("|")
        calls[(op, status)] = int(value)
    lag = {field.decode(): float(value) for field, value in raw_lag.items()}
    return RedisFigures(calls, lag, int(spent), int(paused_ms))


class RoomkeeperCollector(Collector):
    """Builds every `roomkeeper_` metric afresh at each scrape."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "roomkeeper_metrics_source_up",
            "1 when the scrape could read this source (database, redis), else 0 and its metrics are left out",
            labels=["source"],
        )
        try:
            figures = read_store()
        except Exception as error:
            log.warning("metrics: the database did not answer: %s", describe(error))
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            yield from self._store_metrics(figures)
        try:
            counters = read_redis()
        except Exception as error:
            log.warning("metrics: Redis did not answer: %s", describe(error))
            up.add_metric(["redis"], 0)
        else:
            up.add_metric(["redis"], 1)
            yield from self._redis_metrics(counters)
        yield up

    @staticmethod
    def _store_metrics(figures: StoreFigures) -> Iterator[Metric]:
        meetings = GaugeMetricFamily(
            "roomkeeper_meetings", "Meetings in the store by state", labels=["state"]
        )
        for state, count in figures.meetings.items():
            meetings.add_metric([state], count)
        yield meetings
        yield GaugeMetricFamily("roomkeeper_rooms_live", "Whereby rooms live now", value=figures.rooms_live)
        yield GaugeMetricFamily(
            "roomkeeper_rooms_overrunning",
            "Live rooms kept past their meeting's end because people are still inside",
            value=figures.rooms_overrunning,
        )
        yield GaugeMetricFamily(
            "roomkeeper_oldest_overdue_deletion_seconds",
            "How long the live room most overdue for deletion has been due (0 when none is)",
            value=figures.oldest_overdue,
        )

    @staticmethod
    def _redis_metrics(counters: RedisFigures) -> Iterator[Metric]:
        limit = get_settings().api_points_per_minute
        if limit > 0:  # with the limiter off (0) there is no budget to report
            yield GaugeMetricFamily(
                "roomkeeper_whereby_points_left",
                "Whereby points left in the current 60 s window of the shared budget",
                value=max(0, limit - counters.points_spent),
            )
        yield GaugeMetricFamily(
            "roomkeeper_whereby_paused_seconds",
            "How long every worker still holds its Whereby calls after a 429 or 401 (0 when none)",
            value=counters.paused_ms / 1000,
        )
        calls = CounterMetricFamily(
            "roomkeeper_whereby_calls",
            "Whereby API calls (each HTTP attempt) by operation and status or error class",
            labels=["operation", "status"],
        )
        for (op, status), count in sorted(counters.calls.items()):
            calls.add_metric([op, status], count)
        yield calls
        cumulative, buckets = 0.0, []
        for bound in LAG_BUCKETS:
            cumulative += counters.lag.get(_bound(bound), 0.0)
            buckets.append((_bound(bound), cumulative))
        yield HistogramMetricFamily(
            "roomkeeper_deletion_lag_seconds",
            "How long after its due instant each room was deleted",
            buckets=buckets,
            sum_value=counters.lag.get("sum", 0.0),
        )
