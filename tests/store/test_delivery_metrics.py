"""`/metrics` for events to notify URLs: attempts by outcome, the latency histogram, the backlog.

The outcomes and latencies are counted by the delivery code as it runs (here `delivery.deliver`,
called as a plain function against real HTTP receivers on 127.0.0.1); the backlog is read from the
store at scrape time. Everything is read back through the web app as Prometheus scrapes it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BROKER, apply_settings
from tests.processes.test_metrics import Samples, scrape, value
from tests.processes.test_notify_url import SECRET, Receiver
from worker.adapters import metrics, metrics_export
from worker.devtools.localredis import free_port
from worker.faces.web.app import create_app
from worker.jobs import delivery, delivery_chain
from worker.store import journal, session_scope
from worker.store.models import DeliveryState, EventDelivery


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def notify_store(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """The test database with a signing secret and 127.0.0.1 allowed; retries are recorded, not sent."""
    apply_settings(
        ROOMKEEPER_DATABASE_URL=database,
        ROOMKEEPER_BROKER_URL=BROKER,
        ROOMKEEPER_NOTIFY_SIGNING_SECRET=SECRET,
        ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
    )
    metrics._client().delete(metrics.DELIVERIES_KEY, metrics.DELIVERY_LATENCY_KEY)
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        delivery_chain, "send", lambda booking_id, claim=None, eta=None: sent.append((booking_id, eta))
    )
    yield sent
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None, ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.stop()


def _event(booking_id: str, url: str, created: datetime, event: str = "room.ready", **row: Any) -> None:
    fields = journal.delivery_row(booking_id, event, url, {"event": event, "booking_id": booking_id}, created)
    fields.update(row)
    with session_scope() as session:
        session.add(EventDelivery(**fields))


def outcomes(samples: Samples) -> dict[str, float]:
    return {
        outcome: value(samples, "roomkeeper_event_deliveries_total", outcome=outcome)
        for outcome in metrics.DELIVERY_OUTCOMES
    }


def test_every_outcome_is_listed_at_zero_before_any_attempt(notify_store: Any, client: TestClient) -> None:
    samples = scrape(client)
    for outcome in metrics.DELIVERY_OUTCOMES:
        assert ("roomkeeper_event_deliveries_total", (("outcome", outcome),)) in samples
    assert outcomes(samples) == {"delivered": 0, "retrying": 0, "undelivered": 0}
    assert value(samples, "roomkeeper_event_delivery_latency_seconds_count") == 0
    assert value(samples, "roomkeeper_events_pending") == 0
    assert value(samples, "roomkeeper_oldest_undelivered_event_seconds") == 0


def test_deliveries_are_counted_by_outcome_with_their_latency(
    notify_store: list[tuple[str, Any]], receivers: list[Receiver], client: TestClient
) -> None:
    ok = Receiver(lambda _n: 204).start()
    down = Receiver(lambda _n: 503).start()
    receivers += [ok, down]
    now = datetime.now(UTC)
    # Two events made two minutes ago, delivered now: latencies of about 120 s.
    _event("metrics-ok", ok.url, now - timedelta(seconds=120))
    _event("metrics-ok", ok.url, now - timedelta(seconds=120), event="room.deleted")
    # A receiver answering 503: tried again later (within the retry window) ...
    _event("metrics-retry", down.url, now - timedelta(seconds=30))
    # ... or given up (its event is older than ROOMKEEPER_NOTIFY_RETRY_HOURS).
    _event("metrics-gone", down.url, now - timedelta(hours=25))

    assert delivery.deliver("metrics-ok") == {"delivered": 2, "undelivered": 0, "retrying": 0}
    assert delivery.deliver("metrics-retry") == {"delivered": 0, "undelivered": 0, "retrying": 1}
    assert delivery.deliver("metrics-gone") == {"delivered": 0, "undelivered": 1, "retrying": 0}
    assert [booking for booking, _eta in notify_store] == ["metrics-retry"]  # its retry, with an ETA

    samples = scrape(client)
    assert outcomes(samples) == {"delivered": 2, "retrying": 1, "undelivered": 1}

    def bucket(le: str) -> float:
        return value(samples, "roomkeeper_event_delivery_latency_seconds_bucket", le=le)

    assert value(samples, "roomkeeper_event_delivery_latency_seconds_count") == 2
    assert (bucket("60.0"), bucket("300.0"), bucket("+Inf")) == (0, 2, 2)
    assert 240 <= value(samples, "roomkeeper_event_delivery_latency_seconds_sum") < 260
    # One event still waits (the retry), made 30 s ago; the given-up one does not count.
    assert value(samples, "roomkeeper_events_pending") == 1
    assert 30 <= value(samples, "roomkeeper_oldest_undelivered_event_seconds") < 60

    # A second scrape (another web process would read the same) sees the same counters.
    assert outcomes(scrape(client)) == {"delivered": 2, "retrying": 1, "undelivered": 1}


def test_the_backlog_is_read_from_the_store(notify_store: Any, client: TestClient) -> None:
    now = datetime.now(UTC)
    url = "https://hooks.example.com/rooms"
    _event("backlog-a", url, now - timedelta(seconds=600))
    _event("backlog-a", url, now - timedelta(seconds=5), event="room.deleted")
    _event("backlog-b", url, now - timedelta(seconds=90))
    # Finished ones are not waiting, however old.
    done = {"pending": False, "finished_at": now - timedelta(days=1)}
    _event("backlog-c", url, now - timedelta(days=2), state=DeliveryState.DELIVERED, **done)
    _event("backlog-d", url, now - timedelta(days=3), state=DeliveryState.UNDELIVERED, **done)
    figures = metrics_export.read_store(now)
    assert figures.events_pending == 3
    assert figures.oldest_undelivered == pytest.approx(600, abs=0.01)
    samples = scrape(client)
    assert value(samples, "roomkeeper_events_pending") == 3
    assert 600 <= value(samples, "roomkeeper_oldest_undelivered_event_seconds") < 660


def test_counting_never_raises_when_redis_is_gone(notify_store: Any) -> None:
    apply_settings(ROOMKEEPER_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        metrics.observe_delivery("delivered", 0.3)  # the delivery goes on: no exception
    finally:
        apply_settings(ROOMKEEPER_BROKER_URL=BROKER)
    figures = metrics_export.read_redis()
    assert (figures.deliveries, figures.delivery_latency) == ({}, {})


def test_the_readme_s_alert_examples_name_metrics_a_scrape_has(notify_store: Any, client: TestClient) -> None:
    """Every metric the README's Prometheus alerts use is one /metrics exports (a renamed metric
    would leave an alert that never fires)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(groups:\n.*?)```", readme, re.S)
    assert block is not None
    rules = yaml.safe_load(block.group(1))["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"roomkeeper_[a-z_]+", rule["expr"])}
    assert {"roomkeeper_oldest_undelivered_event_seconds", "roomkeeper_event_deliveries_total"} <= used
    metrics.record_prune_run(time.time(), 0.5, 0)  # the prune's gauges appear once one has run
    exported = {name for name, _labels in scrape(client)}
    # A counter with no sample yet (no Whereby call made) is still declared by its family.
    for family in text_string_to_metric_families(client.get("/metrics").text):
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert used <= exported, used - exported
