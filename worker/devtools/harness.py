"""The service as separate processes (worker, beat) on a Redis of their own, for fault tests and the soak run.

Processes can be SIGKILLed and Redis restarted; the sandbox's own record of rooms is the ground truth.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, text

from worker.devtools.localredis import EmbeddedRedis
from worker.devtools.sandbox import SandboxAdmin
from worker.store import deployment, sqlalchemy_url

ROOT = Path(__file__).resolve().parents[2]  # the repository: worker/devtools/ is two below
BIN = Path(sys.executable).parent

FAST_SETTINGS = {
    "ROOMKEEPER_QUEUE": "rooms",
    "ROOMKEEPER_CREATE_LEAD_SECONDS": "1",
    "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "1",
    "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "3",
    "ROOMKEEPER_RETRY_BASE_SECONDS": "0.3",
    "ROOMKEEPER_RETRY_MAX_SECONDS": "2",
    "ROOMKEEPER_MAX_ATTEMPTS": "6",
    "ROOMKEEPER_CLAIM_LEASE_SECONDS": "2",
    "ROOMKEEPER_RECOVER_INTERVAL_SECONDS": "0.5",
    "ROOMKEEPER_TASK_TIME_LIMIT_SECONDS": "5",
    "ROOMKEEPER_WHEREBY_TIMEOUT_SECONDS": "3",
    "ROOMKEEPER_API_POINTS_PER_MINUTE": "0",
    "ROOMKEEPER_WORKER_CONCURRENCY": "8",
}


def parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass
class Audit:
    """What the sandbox's record says about each booking's rooms."""

    rooms: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    strangers: list[dict[str, Any]] = field(default_factory=list)  # rooms no booking owns

    def max_live_at_once(self, booking_id: str) -> int:
        """Most rooms of this booking alive at the same instant, over the whole run."""
        moments = []
        for room in self.rooms.get(booking_id, []):
            moments.append((parse(room["created_at"]), 1))
            if room["deleted_at"]:
                moments.append((parse(room["deleted_at"]), -1))
        live = peak = 0
        for _, step in sorted(moments, key=lambda m: (m[0], m[1])):
            live += step
            peak = max(peak, live)
        return peak

    def alive_after(self, booking_id: str, moment: datetime) -> list[dict[str, Any]]:
        return [
            r
            for r in self.rooms.get(booking_id, [])
            if r["live"] or (parse(r["deleted_at"]) or moment) > moment
        ]


# Every ProcessSystem made in this process, for the tests' hygiene hook (tests/hygiene.py): once a
# test is over, the logs of the systems it stopped are removed if it passed, kept if it failed.
SYSTEMS: list[ProcessSystem] = []


class ProcessSystem:
    def __init__(
        self, database_url: str, whereby_url: str, admin_url: str, settings: Mapping[str, str] | None = None
    ) -> None:
        self.redis = EmbeddedRedis().start()
        self.database_url = database_url
        self.admin = SandboxAdmin(admin_url)
        self.env = dict(os.environ)
        for name in list(self.env):
            if name.startswith(("ROOMKEEPER_", "WHEREBY_", "FLOWER_")):
                del self.env[name]
        self.env.update(FAST_SETTINGS)
        self.env.update(settings or {})
        self.env.update(
            ROOMKEEPER_BROKER_URL=self.redis.url,
            ROOMKEEPER_DATABASE_URL=database_url,
            WHEREBY_API_URL=whereby_url,
            PYTHONUNBUFFERED="1",
        )
        self.logs = Path(tempfile.mkdtemp(prefix="roomkeeper-faults-"))
        self.stopped = False
        SYSTEMS.append(self)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.beats: list[subprocess.Popen[bytes]] = []
        self.caller = Celery(broker=self.redis.url, backend=self.redis.url)
        self.engine = create_engine(sqlalchemy_url(database_url))

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        return subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker.runtime.app", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers) + 1
        worker = self._spawn(
            f"worker{n}",
            "worker",
            "--loglevel=INFO",
            "-n",
            f"w{n}@%h",
            "--without-mingle",
            "--without-gossip",
        )
        self.workers.append(worker)

        def answers() -> bool:
            replies = self.caller.control.ping(timeout=0.5) or []
            return any(name.startswith(f"w{n}@") for reply in replies for name in reply)

        self.wait_for(answers, timeout=30)
        return worker

    def start_beat(self) -> None:
        self.beats.append(self._spawn(f"beat{len(self.beats) + 1}", "beat", "--loglevel=INFO"))

    def kill_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()

    def restart_redis(self, down_for: float = 1.0) -> None:
        """Redis goes away (losing every message: it keeps nothing on disk) and comes back."""
        assert self.redis.process is not None
        self.redis.process.kill()
        self.redis.process.wait()
        time.sleep(down_for)
        self.redis.start()  # the same port: every client reconnects to it

    def stop(self) -> None:
        processes = [*self.workers, *self.beats]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        quiet_results(self.caller)
        self.caller.close()
        self.redis.stop()
        self.engine.dispose()
        self.stopped = True

    # -- the caller's side ----------------------------------------------------------------------

    def send(self, task: str, timeout: float = 15, **kwargs: Any) -> Any:
        return self.caller.send_task(task, queue="rooms", kwargs=kwargs).get(timeout=timeout)

    def book(self, booking_id: str, start: datetime, end: datetime, **extra: Any) -> dict[str, Any]:
        return self.send(
            "rooms.schedule_meeting",
            booking_id=booking_id,
            start=start.isoformat(),
            end=end.isoformat(),
            **extra,
        )

    def states(self) -> dict[str, str]:
        with self.engine.connect() as connection:
            return dict(connection.execute(text("SELECT booking_id, state FROM meeting")).all())

    def pending_rooms(self) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.execute(text("SELECT count(*) FROM room WHERE state = 'pending'")).scalar_one()
            )

    def audit(self) -> Audit:
        with self.engine.connect() as connection:
            owners: dict[str, str] = dict(
                connection.execute(
                    text(
                        "SELECT room.tag, meeting.booking_id FROM room"
                        " JOIN meeting ON meeting.id = room.meeting_pk"
                    )
                ).all()
            )
        audit = Audit()
        for room in self.admin.rooms(include_deleted=True):
            name = deployment.parse(room["room_name"] or "", "rk")
            booking = owners.get(name.tag) if name is not None else None
            if booking is None:
                audit.strangers.append(room)
            else:
                audit.rooms[booking].append(room)
        return audit

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except Exception:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(interval)


def quiet_results(caller: Celery) -> None:
    """Close the caller's result subscription before its Redis goes away.

    Each AsyncResult unsubscribes from its result channel when it is garbage-collected; with the
    subscription still open and Redis gone, every one of them would retry the dead connection for
    seconds (and print "Retry limit exceeded ..."). Without one, there is nothing to unsubscribe.
    """
    consumer = getattr(caller.backend, "result_consumer", None)
    pubsub = getattr(consumer, "_pubsub", None)
    if consumer is not None and pubsub is not None:
        try:
            pubsub.close()
        finally:
            consumer._pubsub = None


def now() -> datetime:
    return datetime.now(UTC)


def later(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)
