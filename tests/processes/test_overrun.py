"""Never cutting a meeting short (CONTRACT §4.3), end to end on real processes: worker and beat as
the Procfile runs them, `roomkeeper web` receiving the sandbox's own signed webhooks, Redis, and
SQLite or PostgreSQL. People join and leave through the sandbox's admin API, as they would in
Whereby's rooms; each room must go within a second of when the contract says, and never before.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from worker.devtools.harness import BIN, ROOT, ProcessSystem, parse
from worker.devtools.localredis import free_port
from worker.devtools.sandbox import SandboxAdmin, SandboxServer

SECRET = "whsec-process-test"
OVERRUN, GRACE = 6.0, 1.5
SLACK = timedelta(seconds=1)
SETTINGS = {
    "ROOMKEEPER_OVERRUN_MAX_SECONDS": str(OVERRUN),
    "ROOMKEEPER_REJOIN_GRACE_SECONDS": str(GRACE),
    "ROOMKEEPER_OVERRUN_POLL_SECONDS": "1",
}


class Web:
    """`roomkeeper web` as the Procfile runs it, on a free port."""

    def __init__(self, system: ProcessSystem) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = (system.logs / "web.log").open("ab")
        self.process = subprocess.Popen(
            [str(BIN / "roomkeeper"), "web", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=system.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        system.wait_for(self._answers, timeout=30)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture
def admin(sandbox: SandboxAdmin) -> Iterator[SandboxAdmin]:
    yield sandbox
    sandbox.set_faults(webhook_url=None, webhook_secret=None)


def start(
    database: str, server: SandboxServer, admin: SandboxAdmin, *, webhooks: bool
) -> tuple[ProcessSystem, Web]:
    settings = dict(SETTINGS)
    if webhooks:
        settings["ROOMKEEPER_WHEREBY_WEBHOOK_SECRET"] = SECRET
    system = ProcessSystem(database, server.url, server.admin_url, settings)
    system.start_worker()
    system.start_beat()
    web = Web(system)
    if webhooks:
        admin.set_faults(webhook_url=f"{web.url}/whereby/webhooks", webhook_secret=SECRET)
    return system, web


def now() -> datetime:
    return datetime.now(UTC)


def book(system: ProcessSystem, booking_id: str, end: datetime) -> None:
    system.book(booking_id, now() + timedelta(seconds=1), end)


def room_of(system: ProcessSystem, booking_id: str) -> dict[str, Any]:
    return dict(
        system.wait_for(lambda: system.send("rooms.get_meeting", booking_id=booking_id)["room"], timeout=20)
    )


def sandbox_room(admin: SandboxAdmin, meeting_id: str) -> dict[str, Any]:
    (found,) = [r for r in admin.rooms() if r["meeting_id"] == meeting_id]
    return dict(found)


def deleted_at(admin: SandboxAdmin, system: ProcessSystem, meeting_id: str, timeout: float = 20) -> datetime:
    system.wait_for(lambda: sandbox_room(admin, meeting_id)["deleted_at"], timeout=timeout)
    return parse(sandbox_room(admin, meeting_id)["deleted_at"]) or now()


def sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - now()).total_seconds()))


def test_rooms_go_when_their_meetings_are_really_over(
    database: str, sandbox_server: SandboxServer, admin: SandboxAdmin
) -> None:
    system, web = start(database, sandbox_server, admin, webhooks=True)
    try:
        end = now() + timedelta(seconds=6)
        for name in ("nobody", "left-early", "overrun", "stays", "cancelled"):
            book(system, name, end)
        rooms = {
            name: room_of(system, name)["meeting_id"]
            for name in ("nobody", "left-early", "overrun", "stays", "cancelled")
        }
        people = {name: admin.join(rooms[name]) for name in ("left-early", "overrun", "stays", "cancelled")}
        system.wait_for(
            lambda: system.send("rooms.get_meeting", booking_id="stays")["occupancy"]["participants"] == 1
        )
        admin.leave(rooms["left-early"], people["left-early"])
        sleep_until(end + timedelta(seconds=2))
        view = system.send("rooms.get_meeting", booking_id="overrun")
        assert view["state"] == "ready" and view["room"] is not None  # held for the person inside
        left = now()
        admin.leave(rooms["overrun"], people["overrun"])
        cancelled = now()
        system.send("rooms.cancel_meeting", booking_id="cancelled")

        for name in ("nobody", "left-early"):
            assert end <= deleted_at(admin, system, rooms[name]) <= end + SLACK, name
        assert cancelled <= deleted_at(admin, system, rooms["cancelled"]) <= cancelled + SLACK
        released = deleted_at(admin, system, rooms["overrun"])
        assert left + timedelta(seconds=GRACE) - timedelta(seconds=0.2) <= released
        assert released <= left + timedelta(seconds=GRACE) + SLACK
        cap = end + timedelta(seconds=OVERRUN)
        assert cap <= deleted_at(admin, system, rooms["stays"]) <= cap + SLACK
        # Nobody was cut off before the contract allowed: only the cap and the cancel removed anyone.
        for name in ("nobody", "left-early", "overrun"):
            assert not sandbox_room(admin, rooms[name]).get("deleted_with_participants"), name
        states = {name: system.send("rooms.get_meeting", booking_id=name)["state"] for name in rooms}
        assert states == {
            "nobody": "ended",
            "left-early": "ended",
            "overrun": "ended",
            "stays": "ended",
            "cancelled": "cancelled",
        }
    finally:
        web.stop()
        system.stop()


def test_without_webhooks_whereby_is_asked_whether_a_session_goes_on(
    database: str, sandbox_server: SandboxServer, admin: SandboxAdmin
) -> None:
    system, web = start(database, sandbox_server, admin, webhooks=False)
    try:
        end = now() + timedelta(seconds=5)
        book(system, "poll-empty", end)
        book(system, "poll-overrun", end)
        empty, busy = (
            room_of(system, "poll-empty")["meeting_id"],
            room_of(system, "poll-overrun")["meeting_id"],
        )
        person = admin.join(busy)
        sleep_until(end + timedelta(seconds=2.5))
        assert sandbox_room(admin, busy)["deleted_at"] is None
        left = now()
        admin.leave(busy, person)
        assert end <= deleted_at(admin, system, empty) <= end + SLACK
        released = deleted_at(admin, system, busy)
        # Asked again within a poll (1 s); the session's end then waits out the rejoin grace.
        assert left + timedelta(seconds=GRACE) - timedelta(seconds=0.2) <= released
        assert released <= left + timedelta(seconds=GRACE + 1) + SLACK
        asked = [c for c in admin.calls() if "insights/room-sessions" in c.get("path", "")]
        assert len(asked) >= 3  # at the end of each meeting, and again while the session went on
        assert not sandbox_room(admin, busy).get("deleted_with_participants")
    finally:
        web.stop()
        system.stop()


def test_repeated_and_reordered_deliveries_change_nothing(
    database: str, sandbox_server: SandboxServer, admin: SandboxAdmin
) -> None:
    system, web = start(database, sandbox_server, admin, webhooks=True)
    admin.set_faults(webhook_duplicate_rate=0.5, webhook_reorder_rate=0.5)
    try:
        end = now() + timedelta(seconds=6)
        book(system, "faulty", end)
        meeting_id = room_of(system, "faulty")["meeting_id"]
        first, second = admin.join(meeting_id), admin.join(meeting_id)
        admin.leave(meeting_id, first)
        system.wait_for(
            lambda: system.send("rooms.get_meeting", booking_id="faulty")["occupancy"]["participants"] == 1,
            timeout=10,
        )
        sleep_until(end + timedelta(seconds=1.5))
        assert sandbox_room(admin, meeting_id)["deleted_at"] is None
        left = now()
        admin.leave(meeting_id, second)
        released = deleted_at(admin, system, meeting_id)
        assert (
            left + timedelta(seconds=GRACE) - timedelta(seconds=0.2)
            <= released
            <= left + timedelta(seconds=GRACE + 1.5)
        )
    finally:
        admin.set_faults(webhook_duplicate_rate=0, webhook_reorder_rate=0)
        web.stop()
        system.stop()
