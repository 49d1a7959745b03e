"""The metrics read at scrape time (CONTRACT §4.1): the store's aggregates, Redis's figures, and
the Prometheus collector that puts them together with what the workers recorded (`metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlmodel import col

from config.settings import get_settings
from worker.adapters import budget
from worker.adapters.metrics import (
    BUDGET_PAUSED_KEY,
    BUDGET_WINDOW_KEY,
    CALLS_KEY,
    DELIVERIES_KEY,
    DELIVERY_BUCKETS,
    DELIVERY_LATENCY_KEY,
    DELIVERY_OUTCOMES,
    LAG_BUCKETS,
    LAG_KEY,
    PRUNE_BACKLOG_CAP,
    PRUNE_KEY,
    PRUNED_TABLES,
    _bound,
    _client,
    _connect,
    describe,
)
from worker.store.models import (
    TERMINAL_STATES,
    EventDelivery,
    Meeting,
    MeetingState,
    Room,
    RoomState,
    utcnow,
)

log = logging.getLogger(__name__)


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
    events_pending: int = 0
    oldest_undelivered: float = 0.0
    prune_backlog: int | None = None  # None: retention is off


@dataclass
class RedisFigures:
    calls: dict[tuple[str, str], int]
    lag: dict[str, float]
    points_spent: int
    paused_ms: int
    deliveries: dict[str, int] = field(default_factory=dict)
    delivery_latency: dict[str, float] = field(default_factory=dict)
    prune: dict[str, float] = field(default_factory=dict)


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
        # Events still waiting for their notify URL: the pending rows only, a partial index's worth.
        pending, oldest_event = connection.execute(
            select(func.count(), func.min(col(EventDelivery.created_at))).where(
                col(EventDelivery.pending).is_(True)
            )
        ).one()
        backlog = None
        days = get_settings().retention_days
        if days > 0:
            # Finished meetings past retention (a range scan of ix_meeting_state_end per state),
            # counted up to the cap: what the next prune has to do.
            waiting = (
                select(col(Meeting.id))
                .where(
                    col(Meeting.state).in_(sorted(TERMINAL_STATES)),
                    col(Meeting.end) < now - timedelta(days=days),
                )
                .limit(PRUNE_BACKLOG_CAP)
                .subquery()
            )
            backlog = int(connection.execute(select(func.count()).select_from(waiting)).scalar_one())
    oldest_due: datetime | None = row[2]
    overdue = max(0.0, (now - oldest_due).total_seconds()) if oldest_due is not None else 0.0
    waited = max(0.0, (now - oldest_event).total_seconds()) if oldest_event is not None else 0.0
    return StoreFigures(meetings, int(row[0]), int(row[1]), overdue, int(pending), waited, backlog)


def read_redis() -> RedisFigures:
    """The workers' counters and the point budget's window, in one round trip."""
    client = _client()
    script = client.register_script(_BUDGET_READ)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(CALLS_KEY)
    pipe.hgetall(LAG_KEY)
    script(keys=[BUDGET_WINDOW_KEY, BUDGET_PAUSED_KEY], args=[budget.WINDOW_MS], client=pipe)
    pipe.hgetall(DELIVERIES_KEY)
    pipe.hgetall(DELIVERY_LATENCY_KEY)
    pipe.hgetall(PRUNE_KEY)
    raw_calls, raw_lag, (spent, paused_ms), raw_deliveries, raw_latency, raw_prune = pipe.execute()
    calls: dict[tuple[str, str], int] = {}
    for name, value in raw_calls.items():
        op, _, status = name.decode().partition("|")
        calls[(op, status)] = int(value)
    lag = {name.decode(): float(value) for name, value in raw_lag.items()}
    deliveries = {name.decode(): int(value) for name, value in raw_deliveries.items()}
    latency = {name.decode(): float(value) for name, value in raw_latency.items()}
    prune = {name.decode(): float(value) for name, value in raw_prune.items()}
    return RedisFigures(calls, lag, int(spent), int(paused_ms), deliveries, latency, prune)


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
        yield GaugeMetricFamily(
            "roomkeeper_events_pending",
            "Events to notify URLs not yet delivered nor given up",
            value=figures.events_pending,
        )
        yield GaugeMetricFamily(
            "roomkeeper_oldest_undelivered_event_seconds",
            "Age of the oldest event to a notify URL not yet delivered nor given up (0 when none waits)",
            value=figures.oldest_undelivered,
        )
        if figures.prune_backlog is not None:  # left out with retention off
            yield GaugeMetricFamily(
                "roomkeeper_prune_backlog_meetings",
                f"Finished meetings past ROOMKEEPER_RETENTION_DAYS still stored (counted up to "
                f"{PRUNE_BACKLOG_CAP})",
                value=figures.prune_backlog,
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
        yield _histogram(
            "roomkeeper_deletion_lag_seconds",
            "How long after its due instant each room was deleted",
            LAG_BUCKETS,
            counters.lag,
        )
        deliveries = CounterMetricFamily(
            "roomkeeper_event_deliveries",
            "Attempts to deliver events to notify URLs by outcome: delivered, retrying (failed, tried "
            "again later), undelivered (given up)",
            labels=["outcome"],
        )
        for name in DELIVERY_OUTCOMES:  # every outcome listed, zeros included
            deliveries.add_metric([name], counters.deliveries.get(name, 0))
        yield deliveries
        yield _histogram(
            "roomkeeper_event_delivery_latency_seconds",
            "How long after its event each delivered event was answered 2xx by its notify URL",
            DELIVERY_BUCKETS,
            counters.delivery_latency,
        )
        pruned = CounterMetricFamily(
            "roomkeeper_pruned_rows",
            "Rows removed by retention, per table, as each batch commits",
            labels=["table"],
        )
        for table in PRUNED_TABLES:
            pruned.add_metric([table], counters.prune.get(f"removed|{table}", 0))
        yield pruned
        if "last_finished" in counters.prune:  # left out until a prune has run
            yield GaugeMetricFamily(
                "roomkeeper_prune_last_run_timestamp_seconds",
                "When the last complete prune run finished (Unix time)",
                value=counters.prune["last_finished"],
            )
            yield GaugeMetricFamily(
                "roomkeeper_prune_last_run_seconds",
                "How long the last complete prune run took",
                value=counters.prune.get("last_seconds", 0.0),
            )
            yield GaugeMetricFamily(
                "roomkeeper_prune_last_run_rows",
                "Rows the last complete prune run removed",
                value=counters.prune.get("last_removed", 0.0),
            )


def _histogram(
    name: str, documentation: str, bounds: tuple[float, ...], recorded: dict[str, float]
) -> HistogramMetricFamily:
    """A histogram from a Redis hash of per-bucket counts and "sum" (see _observe)."""
    cumulative, buckets = 0.0, []
    for bound in bounds:
        cumulative += recorded.get(_bound(bound), 0.0)
        buckets.append((_bound(bound), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=recorded.get("sum", 0.0))
