"""`make demo`: the whole system on embedded defaults, booking sample meetings and checking each one."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from celery import Celery
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker.devtools.localredis import ensure_redis, free_port
from worker.devtools.processes import ROOT, process_env, run_processes
from worker.devtools.sandbox import SandboxAdmin

console = Console()
LEAD_SECONDS = 6
# A room counts as deleted "at its end" when it is gone within this long of its endDate.
ON_TIME = timedelta(seconds=2)
# The overrunning sample: someone stays this long past the end, then leaves; the room then waits
# REJOIN_GRACE for a rejoin before it goes (CONTRACT §4.3).
STAYS_PAST_END = timedelta(seconds=5)
REJOIN_GRACE = timedelta(seconds=3)
WEBHOOK_SECRET = "demo-webhook-secret"


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass
class Sample:
    booking_id: str
    start: datetime
    end: datetime
    state: str = "sent"
    room_ids: set[str] = field(default_factory=set)
    created: datetime | None = None
    deleted: datetime | None = None
    deleted_by: str | None = None
    verdict: str = ""
    overrun: bool = False  # someone joins this one and stays past its end
    participant: str | None = None
    left: datetime | None = None
    people: int = 0

    @property
    def due(self) -> datetime:
        """When the contract says its room goes: at the end, or after the last one left + the grace."""
        return self.left + REJOIN_GRACE if self.overrun and self.left else self.end

    def check(self) -> bool:
        problems = []
        if self.state != "ended":
            problems.append(f"state {self.state}")
        if len(self.room_ids) != 1:
            problems.append(f"{len(self.room_ids)} rooms")
        if self.created is None or self.created > self.start:
            problems.append("room not ready before the start")
        if self.deleted is None or self.deleted_by != "api":
            problems.append("room not deleted by the service")
        elif not (self.due - timedelta(milliseconds=200) <= self.deleted <= self.due + ON_TIME):
            problems.append(f"deleted {(self.deleted - self.due).total_seconds():+.1f}s from when it was due")
        if self.overrun and self.left is None:
            problems.append("nobody stayed past its end")
        self.verdict = "ok" if not problems else "; ".join(problems)
        return not problems


class Driver:
    def __init__(self, meetings: int, timeout: float, broker: str, sandbox: str, flower: str) -> None:
        self.admin = SandboxAdmin(f"{sandbox}/_sandbox")
        self.count = meetings
        self.timeout = timeout
        self.caller = Celery(broker=broker, backend=broker)
        self.sandbox = sandbox
        self.flower = flower
        self.samples: list[Sample] = []
        self.ok = False
        self.error: str | None = None
        self.done = threading.Event()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.sandbox}/_sandbox/health", timeout=1).raise_for_status()
                if self.caller.control.ping(timeout=1):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the sandbox or the worker did not come up within 60 s (see var/demo.log)")

    def book(self) -> None:
        now = datetime.now(UTC)
        for i in range(self.count):
            start = now + timedelta(seconds=LEAD_SECONDS + 4 + 3 * i)
            end = start + timedelta(seconds=8 + 2 * i)
            sample = Sample(f"demo-{now:%H%M%S}-{i + 1}", start, end, overrun=i == 1)
            self.samples.append(sample)
            view = self.caller.send_task(
                "rooms.schedule_meeting",
                queue="rooms",
                kwargs={
                    "booking_id": sample.booking_id,
                    "start": start.isoformat(),
                    "end": end.isoformat(),
                    "room": {"room_mode": "group", "fields": ["hostRoomUrl"]},
                    "metadata": {"demo": True, "n": i + 1},
                },
            ).get(timeout=30)
            sample.state = view["state"]

    def poll(self) -> bool:
        rooms = httpx.get(f"{self.sandbox}/_sandbox/rooms", params={"include_deleted": 1}, timeout=5).json()
        by_id = {room["meeting_id"]: room for room in rooms}
        results = [
            self.caller.send_task("rooms.get_meeting", queue="rooms", kwargs={"booking_id": s.booking_id})
            for s in self.samples
        ]
        for sample, result in zip(self.samples, results, strict=True):
            view = result.get(timeout=30)
            sample.state = view["state"]
            if view["room"]:
                sample.room_ids.add(view["room"]["meeting_id"])
            for room_id in sample.room_ids:
                room = by_id.get(room_id, {})
                sample.created = _parse(room.get("created_at"))
                sample.deleted = _parse(room.get("deleted_at"))
                sample.deleted_by = room.get("deleted_by")
                sample.people = int(room.get("participants") or 0)
            self.act(sample, view)
        # Every room the sandbox holds must belong to exactly one sample: none duplicated, none stray.
        self.stray = len(rooms) - sum(len(s.room_ids) for s in self.samples)
        return all(s.state in ("ended", "failed", "cancelled") for s in self.samples)

    def act(self, sample: Sample, view: dict[str, Any]) -> None:
        """The overrunning sample's participant: joins once the room is ready, stays past the end."""
        if not sample.overrun or not view["room"]:
            return
        now = datetime.now(UTC)
        if sample.participant is None:
            sample.participant = self.admin.join(view["room"]["meeting_id"], role="host")
        elif sample.left is None and now >= sample.end + STAYS_PAST_END:
            self.admin.leave(view["room"]["meeting_id"], sample.participant)
            sample.left = datetime.now(UTC)

    def table(self) -> Table:
        now = datetime.now(UTC)
        table = Table(title=f"roomkeeper demo  ·  Flower: {self.flower}  ·  {now:%H:%M:%S} UTC")
        for column in ("booking", "state", "people", "starts in", "ends in", "room ready", "room deleted"):
            table.add_column(column)
        for s in self.samples:
            table.add_row(
                s.booking_id,
                s.state,
                str(s.people) + (" (stays past the end)" if s.overrun and not s.left else ""),
                f"{(s.start - now).total_seconds():+.0f}s",
                f"{(s.end - now).total_seconds():+.0f}s",
                f"{(s.created - s.start).total_seconds():+.1f}s vs start" if s.created else "",
                f"{(s.deleted - s.end).total_seconds():+.2f}s vs end" if s.deleted else "",
            )
        return table

    def __call__(self, _manager: Any) -> None:
        try:
            console.print(f"Flower: {self.flower}   (process logs: var/demo.log)")
            self.wait_ready()
            self.book()
            deadline = time.monotonic() + self.timeout
            with Live(self.table(), console=console, refresh_per_second=4) as live:
                finished = False
                while not finished and time.monotonic() < deadline:
                    finished = self.poll()
                    live.update(self.table())
                    time.sleep(0.5)
            console.print()
            self.poll()
            self.ok = all([s.check() for s in self.samples]) and self.stray == 0 and finished
        except Exception as exc:  # shown in the summary; the processes are stopped either way
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def summary(self) -> None:
        table = Table(
            "booking",
            "state",
            "rooms",
            "ready before start",
            "deleted after end",
            "after it was due",
            "verdict",
            title="summary",
        )
        for s in self.samples:
            table.add_row(
                s.booking_id,
                s.state,
                str(len(s.room_ids)),
                f"{(s.start - s.created).total_seconds():.1f}s" if s.created else "-",
                f"{(s.deleted - s.end).total_seconds():.3f}s" if s.deleted else "-",
                f"{(s.deleted - s.due).total_seconds():.3f}s" if s.deleted else "-",
                s.verdict + (" (ran over; went once its last participant had left)" if s.overrun else ""),
            )
        console.print(table)
        if self.error:
            console.print(f"[red]demo failed: {self.error}[/red]")
        if getattr(self, "stray", 0):
            console.print(f"[red]{self.stray} room(s) on the sandbox belong to no sample meeting[/red]")
        verdict = (
            "[green]every meeting got its room before its start and lost it at its end; the one that ran"
            " over kept its room until its last participant had left[/green]"
        )
        console.print(
            verdict if self.ok else "[red]some meetings did not go through their lifecycle on time[/red]"
        )


def run_demo(meetings: int, timeout: float) -> int:
    broker, embedded = ensure_redis(os.environ.get("ROOMKEEPER_BROKER_URL", "redis://localhost:6379/0"))
    var = ROOT / "var"
    var.mkdir(exist_ok=True)
    database = var / "demo.db"
    for leftover in var.glob("demo.db*"):
        leftover.unlink()
    sandbox_port, flower_port, web_port = free_port(), free_port(), free_port()
    env = {
        "ROOMKEEPER_BROKER_URL": broker,
        "ROOMKEEPER_RESULT_BACKEND": broker,
        "ROOMKEEPER_DATABASE_URL": f"sqlite:///{database}",
        "ROOMKEEPER_QUEUE": "rooms",
        "ROOMKEEPER_CREATE_LEAD_SECONDS": str(LEAD_SECONDS),
        "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "2",
        "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "30",
        "ROOMKEEPER_RETRY_BASE_SECONDS": "1",
        "WHEREBY_API_URL": f"http://127.0.0.1:{sandbox_port}/v1",
        "SANDBOX_PORT": str(sandbox_port),
        # Flower shows host room keys: without credentials it serves this host only.
        "FLOWER_ADDRESS": "127.0.0.1",
        "ROOMKEEPER_WEB_PORT": str(web_port),
        "ROOMKEEPER_WEB_HOST": "127.0.0.1",
        # Who is in each room: the sandbox sends signed webhooks to the web process, as Whereby would.
        "ROOMKEEPER_WHEREBY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ROOMKEEPER_OVERRUN_MAX_SECONDS": "120",
        "ROOMKEEPER_REJOIN_GRACE_SECONDS": str(REJOIN_GRACE.total_seconds()),
        "SANDBOX_WEBHOOK_URL": f"http://127.0.0.1:{web_port}/whereby/webhooks",
        "SANDBOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    env_all = process_env(env)
    env_all.pop("WHEREBY_API_KEY", None)  # the demo never talks to the real Whereby
    os.environ.update(env)
    os.environ.pop("WHEREBY_API_KEY", None)
    from config.settings import reset_settings
    from worker.store import migrate

    reset_settings()
    migrate()
    driver = Driver(
        meetings, timeout, broker, f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{flower_port}"
    )
    console.print(f"Metrics: http://127.0.0.1:{web_port}/metrics")
    with Path(var / "demo.log").open("w") as log:
        run_processes(
            ["sandbox", "worker", "beat", "flower", "web"],
            env_all,
            output=log,
            ports={"flower": flower_port},
            driver=driver,
        )
    driver.done.wait(timeout=5)
    driver.summary()
    if embedded is not None:
        embedded.stop()
    return 0 if driver.ok else 1
