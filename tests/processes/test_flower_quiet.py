"""Flower after many idle beat ticks: no tick rows, and the last booking's tasks on the first page."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from worker.devtools.harness import BIN, ROOT, ProcessSystem, later
from worker.devtools.localredis import free_port
from worker.devtools.sandbox import SandboxAdmin, SandboxServer

AUTH = ("ops", "secret")
TICKS = {"rooms.dispatch_due", "rooms.recover_overdue", "rooms.reconcile"}
FIRST_PAGE = 15  # rows on the first page of Flower's task list, by default


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    settings = {
        # Ticks far faster than the defaults: a few seconds stand for an idle hour.
        "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "0.5",
        "ROOMKEEPER_RECOVER_INTERVAL_SECONDS": "0.2",
        "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "1",
    }
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url, settings)
    try:
        yield system
    finally:
        system.stop()


@pytest.fixture
def flower(procs: ProcessSystem) -> Iterator[str]:
    port = free_port()
    env = dict(procs.env, FLOWER_BASIC_AUTH="ops:secret")
    log = (procs.logs / "flower.log").open("ab")
    process = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.runtime.app", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_for(lambda: httpx.get(url, auth=AUTH, timeout=1).status_code == 200, timeout=30)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def tasks(flower: str) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
    return list(found.values())


def beat_runs(procs: ProcessSystem) -> int:
    text = "".join(path.read_text(errors="replace") for path in procs.logs.glob("beat*.log"))
    return text.count("beat: running ")


# What Flower shows does not depend on the store: one database is enough.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_idle_ticks_leave_flower_showing_the_last_booking(procs: ProcessSystem, flower: str) -> None:
    procs.start_worker()
    # DEBUG: each in-process run leaves a line in beat's log, to count the ticks.
    procs.beats.append(procs._spawn("beat1", "beat", "--loglevel=DEBUG"))

    start = later(4)
    procs.book("quiet-1", start, start + timedelta(seconds=2))
    procs.wait_for(lambda: procs.states().get("quiet-1") == "ended", timeout=30)
    procs.wait_for(
        lambda: {"rooms.create_room", "rooms.delete_room"} <= {t["name"] for t in tasks(flower)}, timeout=15
    )

    # Idle: nothing is due, beat keeps ticking.
    idle_from = beat_runs(procs)
    time.sleep(8)
    assert beat_runs(procs) - idle_from >= 20, f"beat hardly ticked; logs in {procs.logs}"

    seen = tasks(flower)
    ticks = [t for t in seen if t["name"] in TICKS]
    # One row at most: the kick each worker sends itself when it starts, not one a tick.
    assert [t["name"] for t in ticks] in ([], ["rooms.dispatch_due"]), ticks
    assert len(seen) <= FIRST_PAGE, [t["name"] for t in seen]
    by_name = {t["name"]: t for t in seen if "quiet-1" in str(t.get("kwargs"))}
    assert {"rooms.schedule_meeting", "rooms.create_room", "rooms.delete_room"} <= set(by_name), seen
    assert by_name["rooms.create_room"]["state"] == "SUCCESS"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_failed_whereby_call_shows_as_failure_with_its_booking_and_reason(
    procs: ProcessSystem, flower: str, sandbox: SandboxAdmin
) -> None:
    procs.start_worker()
    procs.start_beat()
    sandbox.script({"method": "POST", "action": "error", "status": 503})
    start = later(3)
    procs.book("fails-once", start, start + timedelta(seconds=30))
    procs.wait_for(lambda: procs.states().get("fails-once") == "ready", timeout=30)

    def failed() -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = httpx.get(
            f"{flower}/api/tasks", params={"state": "FAILURE"}, auth=AUTH, timeout=5
        ).json()
        return list(found.values())

    try:
        (row,) = procs.wait_for(failed, timeout=15)
    except AssertionError:
        raise AssertionError([(t["name"], t["state"], t.get("exception")) for t in tasks(flower)]) from None
    assert row["name"] == "rooms.create_room"
    assert "'booking_id': 'fails-once'" in str(row["kwargs"])
    assert "booking fails-once" in row["exception"] and "ServerError" in row["exception"]
    assert "503" in row["exception"]
    # The retry, planned in the store, made the room: that row is a SUCCESS of its own.
    # The store shows the room before the task has returned and its event reached Flower: wait for it.
    made = procs.wait_for(
        lambda: [t for t in tasks(flower) if t["name"] == "rooms.create_room" and t["state"] == "SUCCESS"],
        timeout=15,
    )
    assert len(made) == 1 and "fails-once" in str(made[0]["kwargs"])
