"""Flower as operators see it: behind basic auth, tasks under their contract names, no API key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BROKER, call, iso, soon, wait_for
from worker.localredis import free_port

SECRET = "sk-flower-SECRET-0b7d"
ROOMKEEPER = str(Path(sys.executable).with_name("roomkeeper"))


def _env_without_credentials() -> dict[str, str]:
    env = dict(os.environ, ROOMKEEPER_BROKER_URL=BROKER)
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_AUTH_PROVIDER", "FLOWER_ADDRESS"):
        env.pop(name, None)
    return env


@pytest.fixture
def flower(system: str, sandbox_server: object) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        ROOMKEEPER_BROKER_URL=BROKER,
        WHEREBY_API_KEY=SECRET,
        WHEREBY_API_URL="http://127.0.0.1:9/v1",
        FLOWER_BASIC_AUTH="ops:secret",
    )
    process = subprocess.Popen(
        [ROOMKEEPER, "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=30, interval=0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_flower_needs_its_password_and_shows_contract_task_names(flower: str) -> None:
    assert httpx.get(flower, timeout=5).status_code == 401
    # The pages that list tasks (and so meeting views with host room keys) too, not only the API.
    for page in ("/tasks", "/tasks/datatable?draw=1&start=0&length=15", "/api/tasks"):
        assert httpx.get(f"{flower}{page}", timeout=5).status_code == 401, page
    auth = ("ops", "secret")
    assert httpx.get(flower, auth=auth, timeout=5).status_code == 200
    call("rooms.schedule_meeting", booking_id="flower-1", start=iso(soon(3600)), end=iso(soon(5400)))

    def tasks() -> dict[str, dict[str, object]]:
        found: dict[str, dict[str, object]] = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        return found if any(t.get("name") == "rooms.schedule_meeting" for t in found.values()) else {}

    seen = wait_for(tasks, timeout=20, interval=0.5)
    schedule = next(t for t in seen.values() if t.get("name") == "rooms.schedule_meeting")
    assert "flower-1" in str(schedule.get("kwargs"))
    pages = str(seen) + httpx.get(f"{flower}/tasks", auth=auth, timeout=5).text
    assert SECRET not in pages


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "example.org"])
def test_flower_refuses_to_serve_beyond_loopback_without_credentials(address: str) -> None:
    result = subprocess.run(
        [ROOMKEEPER, "flower", f"--port={free_port()}", f"--address={address}"],
        env=_env_without_credentials(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FLOWER_BASIC_AUTH" in result.stderr


def test_flower_without_credentials_serves_loopback_only() -> None:
    port = free_port()
    env = _env_without_credentials()
    env["FLOWER_ADDRESS"] = "127.0.0.1"  # as `make run` and `make demo` set it without credentials
    process = subprocess.Popen(
        [ROOMKEEPER, "flower", f"--port={port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), timeout=30, interval=0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/tasks", timeout=5).status_code == 200
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=10)
