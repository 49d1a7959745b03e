"""`roomkeeper web` as the Procfile runs it: liveness, readiness naming what is down, metrics, SIGTERM.

Each test starts the real process on a free port against the test database and Redis, or against
a database or Redis that is not there (a closed port, a port that accepts and never answers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BROKER, wait_for
from worker.devtools.localredis import free_port

ROOT = Path(__file__).resolve().parents[2]
ROOMKEEPER = str(Path(sys.executable).with_name("roomkeeper"))
PASSWORD = "pw-9f1c-never-shown"


class Web:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=15)

    def output(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()


@contextmanager
def web(database_url: str, broker_url: str = BROKER) -> Iterator[Web]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOMKEEPER_", "WHEREBY_"))}
    port = free_port()
    env.update(
        ROOMKEEPER_DATABASE_URL=database_url,
        ROOMKEEPER_BROKER_URL=broker_url,
        ROOMKEEPER_WEB_PORT=str(port),  # as the Procfile runs it: no --port
        ROOMKEEPER_WEB_HOST="127.0.0.1",
        WHEREBY_API_URL="http://127.0.0.1:9/v1",
        ROOMKEEPER_API_POINTS_PER_MINUTE="100",
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        [ROOMKEEPER, "web"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = Web(process, f"http://127.0.0.1:{port}")

    def serving() -> bool:
        assert process.poll() is None, server.output()
        try:
            return server.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(serving, timeout=30, interval=0.2)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word: a hung Redis or database."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def closed_port() -> int:
    return free_port()  # nothing listens there


def problem_of(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, str] = response.json()
    assert body["status"] == 503
    assert PASSWORD not in response.text
    return body


def test_serving_ready_metrics_and_sigterm(database: str) -> None:
    with web(database) as server:
        health = server.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = server.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
        scraped = server.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        names = {family.name for family in text_string_to_metric_families(scraped.text)}
        assert {"roomkeeper_meetings", "roomkeeper_rooms_live", "roomkeeper_whereby_points_left"} <= names
        assert "/healthz" in server.get("/openapi.json").json()["paths"]

        server.process.send_signal(signal.SIGTERM)
        # Uvicorn shuts down gracefully, then re-raises the signal it caught so the exit says why.
        assert server.process.wait(timeout=20) in (0, -signal.SIGTERM)
        log = server.output()
        assert "Shutting down" in log and "Finished server process" in log, log
        assert "Traceback" not in log
        # Successful probes and scrapes leave no access line (they come every few seconds).
        assert '"GET /openapi.json HTTP/1.1" 200' in log
        assert "GET /healthz" not in log and "GET /readyz" not in log and "GET /metrics" not in log
        with pytest.raises(httpx.TransportError):
            server.get("/healthz")


def test_redis_down_is_named_and_the_process_still_serves(database: str) -> None:
    dead = f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0"
    with web(database, broker_url=dead) as server:
        detail = problem_of(server.get("/readyz"))["detail"]
        assert detail.startswith("redis: ") and "database" not in detail, detail
        assert server.get("/healthz").status_code == 200  # alive, only not ready
        # The store's figures are still exported; the Redis ones are left out, and say so.
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
        assert "roomkeeper_meetings" in families and "roomkeeper_whereby_calls" not in families
        up = {s.labels["source"]: s.value for s in families["roomkeeper_metrics_source_up"].samples}
        assert up == {"database": 1.0, "redis": 0.0}
        server.process.terminate()
        server.process.wait(timeout=20)
        log = server.output()
        assert PASSWORD not in log
        assert '"GET /readyz HTTP/1.1" 503' in log  # a failed probe is logged


def test_a_redis_that_never_answers_is_named_within_the_deadline(database: str) -> None:
    with silent_port() as port, web(database, broker_url=f"redis://127.0.0.1:{port}/0") as server:
        detail = problem_of(server.get("/readyz"))["detail"]
        assert detail.startswith("redis: ") and "database" not in detail, detail


@pytest.mark.parametrize("kind", ["postgresql", "sqlite-not-migrated"])
def test_database_down_is_named(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql":
        url = f"postgresql://roomkeeper:{PASSWORD}@127.0.0.1:{closed_port()}/roomkeeper"
    else:
        url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    with web(url) as server:
        detail = problem_of(server.get("/readyz"))["detail"]
        assert detail.startswith("database: ") and "redis" not in detail, detail
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
        up = {s.labels["source"]: s.value for s in families["roomkeeper_metrics_source_up"].samples}
        assert up == {"database": 0.0, "redis": 1.0}
    assert not (tmp_path / "never-migrated.db").exists()  # a readiness check creates no database


def test_both_down_are_both_named(tmp_path: Path) -> None:
    with (
        silent_port() as port,
        web(
            f"postgresql://roomkeeper:{PASSWORD}@127.0.0.1:{port}/roomkeeper",
            broker_url=f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0",
        ) as server,
    ):
        detail = problem_of(server.get("/readyz"))["detail"]
        database, redis = detail.split("; ")
        assert database.startswith("database: ") and redis.startswith("redis: "), detail
