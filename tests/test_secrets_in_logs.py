"""Host room keys rank with the API key: no log line of the service's own processes carries one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest

from tests.harness import ProcessSystem, later
from worker.redact import redact
from worker.sandbox import SandboxAdmin, SandboxServer


def test_redact_hides_the_key_and_keeps_the_rest() -> None:
    line = "result: {'host_room_url': 'https://x.whereby.com/rk-a?roomKey=s3cr3t-Key_9&x=1', 'n': 1}"
    assert (
        redact(line)
        == "result: {'host_room_url': 'https://x.whereby.com/rk-a?roomKey=[redacted]&x=1', 'n': 1}"
    )


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url, {})
    try:
        yield system
    finally:
        system.stop()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_no_log_line_carries_a_host_room_key(procs: ProcessSystem) -> None:
    procs.start_worker()
    procs.start_beat()
    start = later(2)
    procs.book("keys-1", start, start + timedelta(seconds=2), room={"fields": ["hostRoomUrl"]})
    procs.wait_for(lambda: procs.states().get("keys-1") == "ready", timeout=20)
    view = procs.send("rooms.get_meeting", booking_id="keys-1")
    found = re.search(r"roomKey=([^&\s'\"]+)", view["room"]["host_room_url"])
    assert found is not None
    key = found.group(1)
    procs.wait_for(lambda: procs.states().get("keys-1") == "ended", timeout=20)

    logs = {path.name: path.read_text(errors="replace") for path in procs.logs.glob("*.log")}
    assert {"worker1.log", "beat1.log"} <= set(logs)
    for name, text in logs.items():
        assert key not in text, name
    # The worker did log the view (Celery logs each task's result): with the key hidden.
    assert "roomKey=[redacted]" in logs["worker1.log"]
