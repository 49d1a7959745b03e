"""Pieces every benchmark phase shares: the stack as the Procfile runs it, and the figures.

A `Stack` is the sandbox (`roomkeeper sandbox`, its own process), an embedded Redis, a store and
roomkeeper's worker and beat processes started with the Procfile's commands. Figures are read off
the sandbox's own record of rooms and calls, never off the service's opinion of itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import text

from worker import store
from worker.devtools.harness import ProcessSystem, parse
from worker.devtools.localredis import free_port
from worker.devtools.sandbox import SandboxAdmin

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LEAK_GRACE_SECONDS = 5.0

# The service's defaults (CONTRACT §3 and the README), not the fault suite's fast settings: the
# benchmark measures what a user runs. Only the lead time is shortened, so a run takes minutes.
SERVICE_SETTINGS = {
    "ROOMKEEPER_QUEUE": "rooms",
    "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "15",
    "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "300",
    "ROOMKEEPER_RETRY_BASE_SECONDS": "2",
    "ROOMKEEPER_RETRY_MAX_SECONDS": "300",
    "ROOMKEEPER_MAX_ATTEMPTS": "8",
    "ROOMKEEPER_CLAIM_LEASE_SECONDS": "4",
    "ROOMKEEPER_RECOVER_INTERVAL_SECONDS": "2",
    "ROOMKEEPER_TASK_TIME_LIMIT_SECONDS": "60",
    "ROOMKEEPER_WHEREBY_TIMEOUT_SECONDS": "10",
    "ROOMKEEPER_API_POINTS_PER_MINUTE": "0",
    "ROOMKEEPER_WORKER_POOL": "threads",
    "ROOMKEEPER_WORKER_CONCURRENCY": "16",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percentiles(values: Iterable[float], digits: int = 3) -> dict[str, float | int | None]:
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        index = min(len(ordered) - 1, max(0, -(-int(p * len(ordered)) // 100) - 1))
        return round(ordered[index], digits)

    return {
        "n": len(ordered),
        "min": round(ordered[0], digits) if ordered else None,
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": round(ordered[-1], digits) if ordered else None,
    }


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo")
    total_kb = 0
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total_kb = int(line.split()[1])
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(total_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
    }


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), which the kernel keeps for us: no sampling gaps."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def tree_total(pid: int, measure: Callable[[int], float | None]) -> float | None:
    """A figure of a process plus its children (a prefork pool's processes)."""
    total = measure(pid)
    if total is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += measure(int(child)) or 0.0
    return total


def tree_peak_rss_mib(pid: int) -> float | None:
    total = tree_total(pid, peak_rss_mib)
    return None if total is None else round(total, 1)


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far, its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# The sandbox as its own process, as the Procfile's `sandbox` runs it.


class SandboxProcess:
    def __init__(self, latency_ms: float, points_per_minute: int, logs: Path) -> None:
        self.port = free_port()
        self.log = (logs / "sandbox.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(BIN / "roomkeeper"),
                "sandbox",
                f"--port={self.port}",
                f"--latency-ms={latency_ms}",
                f"--points-per-minute={points_per_minute}",
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.admin_url = f"http://127.0.0.1:{self.port}/_sandbox"
        self.admin = SandboxAdmin(self.admin_url, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.admin.health():
                    break
            except Exception:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox did not start; see {logs / 'sandbox.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.admin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


# --------------------------------------------------------------------------------------------
# The store: a fresh SQLite file, or a fresh schema on PostgreSQL.


@dataclass
class Store:
    url: str
    label: str
    cleanup: Callable[[], None]


def postgres_schema(server_url: str, schema: str) -> tuple[str, Callable[[], None]]:
    """A fresh schema on a PostgreSQL server: the URL whose connections use it, and its dropper."""
    with store.get_engine(server_url).begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        store.dispose_engines()
        with store.get_engine(server_url).begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        store.dispose_engines()

    return f"{server_url}{'&' if '?' in server_url else '?'}options=-csearch_path%3D{schema}", drop


def fresh_store(database: str | None, name: str) -> Store:
    if database is None or database.startswith("sqlite"):
        directory = Path(tempfile.mkdtemp(prefix=f"roomkeeper-bench-{name}-"))
        url = f"sqlite:///{directory / 'roomkeeper.db'}"
        store.migrate(url)
        store.dispose_engines()
        return Store(url, "SQLite", lambda: None)
    url, drop = postgres_schema(database, f"bench_{name}_{os.getpid()}")
    store.migrate(url)
    store.dispose_engines()
    return Store(url, "PostgreSQL", drop)


# --------------------------------------------------------------------------------------------
# roomkeeper's processes, started with the Procfile's commands.


@dataclass
class Stack:
    sandbox: SandboxProcess
    procs: ProcessSystem
    store: Store
    logs: Path
    memory: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        name: str,
        *,
        database: str | None,
        latency_ms: float,
        sandbox_points_per_minute: int = 0,
        settings: Mapping[str, str] | None = None,
        workers: int = 1,
    ) -> Stack:
        logs = Path(tempfile.mkdtemp(prefix=f"roomkeeper-bench-{name}-logs-"))
        sandbox = SandboxProcess(latency_ms, sandbox_points_per_minute, logs)
        db = fresh_store(database, name)
        procs = ProcessSystem(db.url, sandbox.url, sandbox.admin_url)
        procs.env.update(SERVICE_SETTINGS)
        procs.env.update(settings or {})
        procs.logs.rmdir()  # the harness's own log directory: this stack's logs go to `logs`
        procs.logs = logs
        stack = cls(sandbox, procs, db, logs)
        for _ in range(workers):
            stack.start_worker()
        stack.start_beat()
        return stack

    def start_worker(self) -> subprocess.Popen[bytes]:
        """`celery -A worker.runtime.app worker --loglevel=INFO --task-events`, as the Procfile runs it."""
        n = len(self.procs.workers) + 1
        worker = self.procs._spawn(
            f"worker{n}", "worker", "--loglevel=INFO", "--task-events", "-n", f"w{n}@%h"
        )
        self.procs.workers.append(worker)

        def answers() -> bool:
            replies = self.procs.caller.control.ping(timeout=0.5) or []
            return any(name.startswith(f"w{n}@") for reply in replies for name in reply)

        self.procs.wait_for(answers, timeout=60)
        return worker

    def start_beat(self) -> None:
        self.procs.start_beat()

    def sample_memory(self) -> dict[str, float | None]:
        for n, worker in enumerate(self.procs.workers, 1):
            if worker.poll() is None:
                self.memory[f"worker{n}"] = tree_peak_rss_mib(worker.pid)
        for n, beat in enumerate(self.procs.beats, 1):
            if beat.poll() is None:
                self.memory[f"beat{n}"] = tree_peak_rss_mib(beat.pid)
        return self.memory

    def worker_cpu_seconds(self) -> float:
        """CPU time all worker processes have used so far."""
        return sum(tree_total(worker.pid, cpu_seconds) or 0.0 for worker in self.procs.workers)

    def stop_workers(self) -> None:
        for worker in self.procs.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in self.procs.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.procs.workers.clear()

    def stop(self) -> None:
        self.sample_memory()
        self.procs.stop()
        self.sandbox.stop()
        self.store.cleanup()


# --------------------------------------------------------------------------------------------
# Figures off the sandbox's record.


@dataclass
class Booked:
    booking_id: str
    start: datetime
    end: datetime


def lifecycle_figures(
    bookings: list[Booked],
    rooms_of: Mapping[str, list[dict[str, Any]]],
    strangers: list[dict[str, Any]],
    calls: list[dict[str, Any]],
    lead_seconds: float,
    until: datetime,
) -> dict[str, Any]:
    """Deletion lag, readiness, calls per meeting, duplicates and leaks for one load."""
    lags, early, duplicates, leaks, missing = [], [], [], [], []
    for booked in bookings:
        rooms = sorted(rooms_of.get(booked.booking_id, []), key=lambda r: r["created_at"])
        if not rooms:
            missing.append(booked.booking_id)
            continue
        if len(rooms) > 1:
            duplicates.append({"booking_id": booked.booking_id, "rooms": len(rooms)})
        first = parse(rooms[0]["created_at"])
        assert first is not None
        early.append((booked.start - first).total_seconds())
        for room in rooms:
            deleted = parse(room["deleted_at"])
            if deleted is None:
                leaks.append(
                    {"booking_id": booked.booking_id, "meeting_id": room["meeting_id"], "live": True}
                )
                continue
            lag = (deleted - booked.end).total_seconds()
            lags.append(lag)
            if lag > LEAK_GRACE_SECONDS:
                leaks.append(
                    {"booking_id": booked.booking_id, "meeting_id": room["meeting_id"], "lag_s": lag}
                )
    by_method: dict[str, int] = {}
    for call in calls:
        by_method[call["method"]] = by_method.get(call["method"], 0) + 1
    n = max(1, len(bookings))
    return {
        "meetings": len(bookings),
        "rooms": sum(len(v) for v in rooms_of.values()),
        "deletion_lag_s": percentiles(lags),
        "ready_before_start_s": {**percentiles(early), "lead_s": lead_seconds},
        "calls_per_meeting": round(len(calls) / n, 3),
        "calls_by_method": by_method,
        "status_429": sum(1 for c in calls if c["status"] == 429),
        "duplicates": len(duplicates),
        "duplicate_bookings": duplicates[:20],
        "leaks": len(leaks),
        "leaked_rooms": leaks[:20],
        "missing": len(missing),
        "strangers": len(strangers),
        "checked_at": iso(until),
    }


def release(caller: Celery, results: list[AsyncResult[Any]]) -> None:
    """Unsubscribe from the results now, while Redis is up.

    Every AsyncResult unsubscribes from its result channel when it is garbage-collected; after the
    phase has stopped its Redis, each of those would retry the dead connection for seconds.
    """
    for result in results:
        caller.backend.remove_pending_result(result)
        result.backend = None
