"""Host room keys rank with the API key: no log line of the service's own processes carries one."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from celery.utils.log import ColorFormatter

from worker.adapters.redact import install, redact
from worker.adapters.whereby_errors import make_status_error
from worker.devtools.harness import ProcessSystem, later
from worker.devtools.sandbox import SandboxAdmin, SandboxServer


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


def _handler_output(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-redact-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    install(logger)
    return logger, stream


@pytest.mark.parametrize(
    "formatter",
    [logging.Formatter("%(levelname)s %(message)s"), ColorFormatter("%(message)s", use_color=False)],
)
def test_tracebacks_stacks_and_encoded_urls_are_redacted_too(formatter: logging.Formatter) -> None:
    logger, stream = _handler_output(formatter)
    try:
        raise RuntimeError("reply: {'hostRoomUrl': 'https://x.whereby.com/rk-a?roomKey=KEY-IN-TRACEBACK'}")
    except RuntimeError:
        logger.exception("call failed for %s", "https://x.whereby.com/rk-a?roomKey=KEY-IN-ARGS")
    logger.warning("to %s", "/login?next=https%3A%2F%2Fx%2Frk-a%3FroomKey%3DKEY-ENCODED", stack_info=True)
    logger.info("nothing secret here: %s", {"room_url": "https://x.whereby.com/rk-a"})
    out = stream.getvalue()
    for key in ("KEY-IN-TRACEBACK", "KEY-IN-ARGS", "KEY-ENCODED"):
        assert key not in out, key
    assert "RuntimeError: reply: {'hostRoomUrl': 'https://x.whereby.com/rk-a?roomKey=[redacted]'}" in out
    assert "roomKey%3D[redacted]" in out
    assert "Stack (most recent call last)" in out  # the stack is kept, only keys go
    assert "nothing secret here: {'room_url': 'https://x.whereby.com/rk-a'}" in out


def test_a_broken_log_call_is_reported_by_the_handler_not_raised_by_the_filter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger, stream = _handler_output(logging.Formatter("%(message)s"))
    logger.info("two %s %s", "roomKey=K")  # one argument short: logging reports it on stderr
    assert "--- Logging error ---" in capsys.readouterr().err
    assert stream.getvalue() == ""


@pytest.mark.parametrize("status", [400, 404, 429, 502])
def test_whereby_error_messages_never_carry_a_room_key(status: int) -> None:
    # A reply that echoes a room URL: its text ends up in the error, so in last_error and history.
    request = httpx.Request("GET", "https://api.whereby.dev/v1/meetings/42")
    body = {"error": "room https://x.whereby.com/rk-a?roomKey=ECHOED-KEY&x=1 is in use"}
    error = make_status_error(httpx.Response(status, json=body, request=request))
    assert "ECHOED-KEY" not in str(error) and "ECHOED-KEY" not in error.message
    assert "roomKey=[redacted]&x=1 is in use" in str(error)
    assert str(error).startswith(f"GET /v1/meetings/42 -> {status}")
