"""Fixtures: a real Redis (or an embedded one), the sandbox server, SQLite and PostgreSQL.

The suite is in three tiers, one folder each, marked by their folder: `pure` (no I/O: no database,
Redis, socket or subprocess), `store` (SQLite, PostgreSQL and Redis, in the test process) and
`processes` (a real worker, beat, web or other program; its fixtures are in tests/processes/conftest.py).
Nothing here starts a server unless a collected test needs one: the pure tier starts nothing.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from tests.hygiene import RunFolder, sqlite_ids_never_reused

# Before anything makes a temporary file: the run's own temporary folder (tests/hygiene.py).
RUN_FOLDER = RunFolder.start()

from worker.devtools.localredis import EmbeddedRedis, answers  # noqa: E402

# The broker must be known before the Celery app is imported: settle it first. When the configured
# Redis does not answer, an embedded one takes its place: its port is picked now, and it starts only
# once a test that is not pure has been collected (`pytest_collection_finish`).
_redis_url = os.environ.get("ROOMKEEPER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_embedded_redis: EmbeddedRedis | None = None
if not answers(_redis_url):
    _embedded_redis = EmbeddedRedis()
    _redis_url = _embedded_redis.url
# A database of its own, flushed by the tests (pick another to run two suites side by side).
BROKER = _redis_url.rsplit("/", 1)[0] + "/" + os.environ.get("ROOMKEEPER_TEST_REDIS_DB", "15")
os.environ["ROOMKEEPER_BROKER_URL"] = BROKER
os.environ["ROOMKEEPER_RESULT_BACKEND"] = BROKER
os.environ.pop("WHEREBY_API_KEY", None)
os.environ["WHEREBY_API_URL"] = "http://127.0.0.1:9/v1"  # replaced by the sandbox's URL below
os.environ["ROOMKEEPER_DATABASE_URL"] = "sqlite:///var/test-import.db"

POSTGRES_SERVER = os.environ.get("ROOMKEEPER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Each run gets a schema of its own, so two suites (or a suite and a developer) never collide.
POSTGRES_SCHEMA = f"roomkeeper_test_{os.getpid()}"
POSTGRES_URL = f"{POSTGRES_SERVER}?options=-csearch_path%3D{POSTGRES_SCHEMA}"

from worker import store  # noqa: E402
from worker.adapters import budget  # noqa: E402
from worker.devtools.sandbox import SandboxAdmin, SandboxConfig, SandboxServer  # noqa: E402
from worker.runtime import process, resources  # noqa: E402
from worker.runtime.app import app  # noqa: E402

process.start()  # what every process's entry installs (the journal's writer, the fork reset ...)

TEST_SETTINGS = {
    "ROOMKEEPER_CREATE_LEAD_SECONDS": "1",
    "ROOMKEEPER_DELETE_GRACE_SECONDS": "0",
    "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "1",
    "ROOMKEEPER_RETRY_BASE_SECONDS": "0.2",
    "ROOMKEEPER_RETRY_MAX_SECONDS": "1",
    "ROOMKEEPER_MAX_ATTEMPTS": "4",
    "ROOMKEEPER_QUEUE": "rooms",
    # The budget has tests of its own; elsewhere it would only slow the suite down.
    "ROOMKEEPER_API_POINTS_PER_MINUTE": "0",
}


def apply_settings(**env: str | None) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    resources.reset()


def clear_budget() -> None:
    """Forget the shared budget's window and any pause a previous test left behind."""
    shared = budget.get_budget()
    shared.client.delete(*shared.keys)


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture(scope="session")
def sandbox_admin(sandbox_server: SandboxServer) -> Iterator[SandboxAdmin]:
    # One client for the run: each new one loads the CA bundle again (tens of milliseconds a test).
    with SandboxAdmin(sandbox_server.admin_url) as admin:
        yield admin


@pytest.fixture
def sandbox(sandbox_admin: SandboxAdmin) -> Iterator[SandboxAdmin]:
    admin = sandbox_admin
    admin.reset()
    admin.set_faults(latency_ms=0, error_rate=0, lost_reply_rate=0, points_per_minute=0, expiry_seconds=86400)
    yield admin


_postgres_checked: list[str | None] = []


def _postgres_available() -> str | None:
    """None when PostgreSQL answers (and this run's schema exists), else why not."""
    if not _postgres_checked:
        try:
            with store.get_engine(POSTGRES_SERVER).begin() as connection:
                connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA}"))
            _postgres_checked.append(None)
        except Exception as exc:
            _postgres_checked.append(f"PostgreSQL not reachable at {POSTGRES_SERVER}: {type(exc).__name__}")
    return _postgres_checked[0]


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_schema() -> Iterator[None]:
    yield
    if _postgres_checked and _postgres_checked[0] is None:
        store.dispose_engines()
        with store.get_engine(POSTGRES_SERVER).begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {POSTGRES_SCHEMA} CASCADE"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    from worker.devtools import harness

    RUN_FOLDER.after_phase(item, report, harness.SYSTEMS)
    return report


TIERS = ("pure", "store", "processes")
# What the pure tier may not ask for: each of these reaches a database, Redis or a server.
NOT_PURE = {
    "database",
    "configured",
    "sandbox",
    "sandbox_server",
    "sandbox_admin",
    "events",
    "system",
    "celery_worker_session",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, its folder's name (`pytest -m pure` runs the pure tier), and
    the tiers run lightest first."""
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(tier)
        needs = NOT_PURE.intersection(getattr(item, "fixturenames", ()))
        if tier == "pure" and needs:
            raise pytest.UsageError(f"{item.nodeid} is in the pure tier but uses {', '.join(sorted(needs))}")
    items.sort(key=lambda item: TIERS.index(item.path.parent.name))


def pytest_collection_finish(session: pytest.Session) -> None:
    # The embedded Redis (when the configured one does not answer) starts only for a test that may use it.
    if _embedded_redis is None or all(item.path.parent.name == "pure" for item in session.items):
        return
    if _embedded_redis.start().url != _redis_url:
        pytest.exit(f"the embedded Redis could not start on {_redis_url}: run again", returncode=3)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if _embedded_redis is not None:
        # Results nobody holds any more unsubscribe from Redis when collected: collected after the
        # server is gone, each retried its reconnection for minutes at exit. Collect them first.
        gc.collect()
        _embedded_redis.stop()  # its folder goes with it
    RUN_FOLDER.finish(session)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    RUN_FOLDER.summary(terminalreporter)


_migrated: set[str] = set()
TABLES = ("history", "outbox", "event_delivery", "webhook_event", "room", "meeting")


def _fresh_database(url: str) -> None:
    if url not in _migrated:
        store.migrate(url)
        if url.startswith("sqlite:///"):
            # Ids are never reused from one test to the next (tests/hygiene.py).
            store.dispose_engines()
            sqlite_ids_never_reused(url.removeprefix("sqlite:///"))
        _migrated.add(url)
    with store.get_engine(url).begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.getbasetemp() / 'roomkeeper.db'}"
    else:
        reason = _postgres_available()
        if reason:
            pytest.skip(reason)
        url = POSTGRES_URL
    _fresh_database(url)
    return url


@pytest.fixture
def configured(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[str]:
    """Settings for one test: its database, the sandbox, second-scale timings."""
    apply_settings(ROOMKEEPER_DATABASE_URL=database, WHEREBY_API_URL=sandbox_server.url, **TEST_SETTINGS)
    clear_budget()
    yield database
    apply_settings(**{name: None for name in TEST_SETTINGS})


class Ticker:
    """Stands in for beat: sends `rooms.dispatch_due` through the broker every interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            app.send_task("rooms.dispatch_due", queue="rooms")

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        self.thread.join()


# --------------------------------------------------------------------------------------------
# Helpers for the tests.


def call(task: str, timeout: float = 15, **kwargs: Any) -> Any:
    """Send a task by name, exactly as a caller that does not import the project would."""
    return app.send_task(task, queue="rooms", kwargs=kwargs).get(timeout=timeout)


def iso(moment: datetime) -> str:
    return moment.isoformat()


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def wait_for(predicate: Callable[[], Any], timeout: float = 15, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Events:
    """Reads the events the service sends to a caller's notify queue, straight off the broker."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.connection = app.connection_for_read()
        self.simple = self.connection.SimpleQueue(queue)
        self.seen: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while True:
            try:
                message = self.simple.get(block=False)
            except self.simple.Empty:
                return self.seen
            body = message.decode() if hasattr(message, "decode") else message.payload
            if isinstance(body, (bytes, str)):
                body = json.loads(body)
            _args, kwargs, _embed = body
            kwargs["_task"] = message.headers.get("task")
            self.seen.append(kwargs)
            message.ack()

    def names(self) -> list[str]:
        return [e["event"] for e in self.drain()]

    def close(self) -> None:
        self.simple.close()
        self.connection.release()


@pytest.fixture
def events() -> Iterator[Events]:
    queue = f"bookings-{os.getpid()}-{time.monotonic_ns()}"
    reader = Events(queue)
    yield reader
    reader.close()
