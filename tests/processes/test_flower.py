"""Flower as operators see it: behind basic auth, tasks under their contract names, no API key."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BROKER, call, iso, soon, wait_for
from worker.devtools.localredis import free_port
from worker.faces import flower as flower_guard

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


def _listening(port: int) -> set[str]:
    """The addresses a TCP socket of this host listens on at `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            host, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(packed)))
    return found


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("::ffff:127.0.0.1", False),  # refused: not worth trusting a mapped address
        ("example.org", False),
    ],
)
def test_loopback_addresses_are_told_from_reachable_ones(address: str, loopback: bool) -> None:
    assert flower_guard.is_loopback(address) is loopback


def test_credentials_are_basic_auth_or_flowers_oauth_with_a_provider() -> None:
    assert flower_guard.refusal({"FLOWER_BASIC_AUTH": "ops:secret"}, "0.0.0.0") is None
    assert flower_guard.refusal({"FLOWER_BASIC_AUTH": "ops:secret,dev:other"}, "") is None
    oauth = {"FLOWER_AUTH": ".*@example.org", "FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler"}
    assert flower_guard.refusal(oauth, "0.0.0.0") is None
    # FLOWER_AUTH alone would close Flower, but nobody could log in: not counted as credentials.
    assert "FLOWER_BASIC_AUTH" in str(flower_guard.refusal({"FLOWER_AUTH": "a@example.org"}, "0.0.0.0"))
    assert "FLOWER_BASIC_AUTH" in str(flower_guard.refusal({"FLOWER_BASIC_AUTH": ""}, "0.0.0.0"))
    assert flower_guard.refusal({}, "127.0.0.1") is None


@pytest.mark.parametrize("value", ["ops", "ops:", ":secret", "ops:secret,", "ops:secret,dev"])
def test_a_malformed_basic_auth_stops_flower_naming_the_variable_even_on_loopback(value: str) -> None:
    env = _env_without_credentials()
    env["FLOWER_BASIC_AUTH"] = value
    result = subprocess.run(
        [ROOMKEEPER, "flower", f"--port={free_port()}", "--address=127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FLOWER_BASIC_AUTH must be user:password" in result.stderr
    assert "secret" not in result.stderr  # the message does not echo the value


def test_flower_on_loopback_listens_on_loopback_only_whatever_flower_address_says() -> None:
    # Flower reads FLOWER_ADDRESS itself: the command line roomkeeper passes it must win.
    port = free_port()
    env = _env_without_credentials()
    env["FLOWER_ADDRESS"] = "0.0.0.0"
    process = subprocess.Popen(
        [ROOMKEEPER, "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), timeout=30, interval=0.3)
        assert _listening(port) == {"127.0.0.1"}
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode in (0, -signal.SIGTERM)  # SIGTERM reached Flower itself


def _run_env(tmp_path: Path) -> dict[str, str]:
    env = _env_without_credentials()
    env.pop("WHEREBY_API_KEY", None)
    env.pop("WHEREBY_API_URL", None)  # the bundled sandbox stands in
    env.update(
        ROOMKEEPER_DATABASE_URL=f"sqlite:///{tmp_path / 'run.db'}",
        ROOMKEEPER_RESULT_BACKEND=BROKER,
        ROOMKEEPER_QUEUE="rooms-flower-run",
        PORT=str(free_port()),
        ROOMKEEPER_WEB_PORT=str(free_port()),  # `run` starts web too: not on a port in use
    )
    return env


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"FLOWER_ADDRESS": "0.0.0.0"}, "without credentials"),
        ({"FLOWER_BASIC_AUTH": "ops"}, "must be user:password"),
    ],
)
def test_roomkeeper_run_stops_before_anything_starts_when_flower_would_refuse(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    env = _run_env(tmp_path) | extra
    result = subprocess.run([ROOMKEEPER, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "FLOWER_BASIC_AUTH" in result.stderr and message in result.stderr
    assert not (tmp_path / "run.db").exists()  # not even migrated


def test_roomkeeper_run_without_credentials_serves_flower_on_loopback_only(tmp_path: Path) -> None:
    env = _run_env(tmp_path)
    port = int(env["PORT"])
    process = subprocess.Popen(
        [ROOMKEEPER, "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group: honcho's children are stopped with it below
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), timeout=60, interval=0.3)
        assert _listening(port) == {"127.0.0.1"}
        assert process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
