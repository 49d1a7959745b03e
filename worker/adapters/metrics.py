"""Operational metrics (CONTRACT §4.1): recorded by workers into Redis, read by any `web` process.

Workers count their Whereby calls and deletion lags into two Redis hashes on the broker, so every
`web` process (stateless, as many as you like) exports the same figures without Prometheus's
multiprocess mode. Everything else is read at scrape time: a few aggregate queries over the store
and the shared point budget's window. Recording never raises: a metric is not worth a lost room.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlmodel import col

from config.settings import get_settings
from worker import store
from worker.adapters import whereby
from worker.runtime import resources
from worker.store.models import (
    Meeting,
)

log = logging.getLogger(__name__)

CALLS_KEY = "roomkeeper:metrics:whereby-calls"  # field "operation|status" -> count
LAG_KEY = "roomkeeper:metrics:deletion-lag"  # field per bucket bound, "sum" and "count"
# budget.Budget's own keys (a test keeps them in step).
BUDGET_WINDOW_KEY = "roomkeeper:budget:window"
BUDGET_PAUSED_KEY = "roomkeeper:budget:paused"
# Deletions are due to the second; most land within a second, a 429 or an outage pushes them out.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)
# Events to notify URLs (worker/jobs/delivery.py): each attempt's outcome, and how long after its event
# each delivered one arrived. A receiver that was down waits out the backoff (capped at 5 minutes)
# and the retry window (ROOMKEEPER_NOTIFY_RETRY_HOURS, at most a week): the buckets reach a day.
DELIVERIES_KEY = "roomkeeper:metrics:event-deliveries"  # field per outcome -> count
DELIVERY_LATENCY_KEY = "roomkeeper:metrics:event-delivery-latency"  # per bucket bound, "sum", "count"
DELIVERY_OUTCOMES = ("delivered", "retrying", "undelivered")
# Retention (worker/jobs/retention.py): rows removed per table ("removed|TABLE", added batch by batch,
# so a long run shows its progress) and the last complete run ("last_finished" as a Unix time,
# "last_seconds", "last_removed").
PRUNE_KEY = "roomkeeper:metrics:prune"
PRUNED_TABLES = ("meeting", "room", "history", "outbox", "event_delivery", "webhook_event")
# Counting the bookings waiting to be pruned stops here: the figure's cost stays bounded when a
# large store is first pruned (it is then reported as at least this).
PRUNE_BACKLOG_CAP = 100_000
DELIVERY_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, math.inf
)  # fmt: skip
# How long a check or a scrape may wait for the database or Redis.
TIMEOUT_SECONDS = 2.0


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(value)


# --------------------------------------------------------------------------------------------
# Per-process connections: one Redis client (recording and reading) and one read-only engine.

# Owned by worker.runtime.resources. Dropped, not closed, on reset: a forked child must not shut
# what its parent still uses.


def _new_client() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().broker_url,
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
        # One try: a worker's task must not wait out redis-py's retries for a metric, and
        # a readiness check wants the answer of now.
        retry=Retry(NoBackoff(), 0),
    )


def _client() -> redis.Redis:
    return resources.own("metrics redis", _new_client)


def _new_read_engine() -> Engine:
    url = store.sqlalchemy_url(get_settings().database_url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": TIMEOUT_SECONDS, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # plain reads, no BEGIN: WAL readers never wait

        return engine
    seconds = math.ceil(TIMEOUT_SECONDS)
    # Added to the URL's own options (a search_path, say), which connect_args would replace.
    options = make_url(url).query.get("options") or ""
    if not isinstance(options, str):
        options = " ".join(options)
    return create_engine(
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


def _read_engine() -> Engine:
    """An engine for reads with short timeouts, apart from the workers' own.

    The store's SQLite engine takes the write lock at BEGIN (see worker/store): a scrape or a
    readiness check must not queue behind writers for that, and on PostgreSQL neither may wait for
    minutes on an unreachable server.
    """
    return resources.own("metrics read engine", _new_read_engine)


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


def _observe(pipe: Any, key: str, buckets: tuple[float, ...], seconds: float) -> None:
    """Queue one histogram observation (its bucket, sum and count) on a pipeline."""
    seconds = max(0.0, float(seconds))
    bucket = next(b for b in buckets if seconds <= b)
    pipe.hincrby(key, _bound(bucket), 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.hincrby(key, "count", 1)


def observe_deletion_lag(seconds: float) -> None:
    """Record how late a room's deletion was against its due instant (one round trip; never raises)."""
    try:
        pipe = _client().pipeline(transaction=True)
        _observe(pipe, LAG_KEY, LAG_BUCKETS, seconds)
        pipe.execute()
    except Exception as exc:
        log.debug("deletion lag not recorded: %s", type(exc).__name__)


def observe_delivery(outcome: str, latency: float | None = None) -> None:
    """Count one attempt to deliver an event to a notify URL by its outcome (delivered, retrying:
    failed and tried again later, undelivered: given up) and, once delivered, how long after the
    event it arrived. One round trip, after the attempt's transaction committed; never raises."""
    try:
        pipe = _client().pipeline(transaction=True)
        pipe.hincrby(DELIVERIES_KEY, outcome, 1)
        if latency is not None:
            _observe(pipe, DELIVERY_LATENCY_KEY, DELIVERY_BUCKETS, latency)
        pipe.execute()
    except Exception as exc:
        log.debug("event delivery not counted: %s", type(exc).__name__)


def record_pruned(removed: dict[str, int]) -> None:
    """Add one prune batch's rows removed, per table (one round trip; never raises)."""
    try:
        pipe = _client().pipeline(transaction=True)
        for table, count in removed.items():
            pipe.hincrby(PRUNE_KEY, f"removed|{table}", count)
        pipe.execute()
    except Exception as exc:
        log.debug("pruned rows not counted: %s", type(exc).__name__)


def record_prune_run(finished: float, seconds: float, removed: int) -> None:
    """Note a complete prune run: when it finished (Unix time), how long it took, rows removed."""
    try:
        _client().hset(
            PRUNE_KEY, mapping={"last_finished": finished, "last_seconds": seconds, "last_removed": removed}
        )
    except Exception as exc:
        log.debug("prune run not recorded: %s", type(exc).__name__)


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


def read_connection() -> Connection:
    """A connection for reads that never takes SQLite's write lock (see _read_engine)."""
    return _connect()


def check_database() -> None:
    """Raise unless the store answers a query on the migrated schema."""
    with _connect() as connection:
        connection.execute(text("SELECT 1"))
        connection.execute(select(col(Meeting.id)).limit(1))  # a store that was never migrated is not ready


def check_redis() -> None:
    """Raise unless the broker answers PING."""
    if not _client().ping():
        raise redis.ConnectionError("no PONG")
