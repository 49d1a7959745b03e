"""The contract driven from another Python process that imports only Celery, as a booking app would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import BROKER, soon
from worker.devtools.sandbox import SandboxAdmin

pytestmark = pytest.mark.usefixtures("system")

CALLER = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    broker, start, end = sys.argv[1:4]
    app = Celery(broker=broker, backend=broker)
    out = {}
    out["booked"] = app.send_task("rooms.schedule_meeting", queue="rooms", kwargs={
        "booking_id": "outside-1", "start": start, "end": end,
        "room": {"room_mode": "group", "fields": ["hostRoomUrl"]},
        "metadata": {"from": "outside"}}).get(timeout=15)
    ref = {"booking_id": "outside-1"}
    out["read"] = app.send_task("rooms.get_meeting", queue="rooms", kwargs=ref).get(timeout=15)
    try:
        app.send_task("rooms.schedule_meeting", queue="rooms", kwargs={
            "booking_id": "outside-2", "start": start, "end": end,
            "room": {"is_locked": "yes"}}).get(timeout=15)
    except Exception as exc:
        out["error"] = {"type": type(exc).__name__, "message": str(exc)}
    out["cancelled"] = app.send_task("rooms.cancel_meeting", queue="rooms", kwargs=ref).get(timeout=15)
    out["project_imported"] = any(m.split(".")[0] in ("worker", "tasks", "config") for m in sys.modules)
    print(json.dumps(out))
    """
)


def test_a_caller_with_only_celery_sees_the_contract(sandbox: SandboxAdmin) -> None:
    start, end = soon(3600), soon(5400)
    done = subprocess.run(
        [sys.executable, "-I", "-c", CALLER, BROKER, start.isoformat(), end.isoformat()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(done.stdout)
    assert out["project_imported"] is False
    assert out["booked"]["booking_id"] == "outside-1"
    assert out["booked"]["state"] == "scheduled"
    assert out["booked"]["metadata"] == {"from": "outside"}
    assert out["read"]["start"].endswith("Z")
    assert out["error"]["type"] == "InvalidRequest"
    assert "room.is_locked" in out["error"]["message"]
    assert "bool" in out["error"]["message"]
    assert out["cancelled"]["state"] == "cancelled"
    assert sandbox.calls() == []  # booked an hour ahead and cancelled: Whereby was never called
