"""What only the processes tier uses: a real worker on the real Redis, and the running service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Ticker
from worker.runtime.app import app


@pytest.fixture(scope="session")
def celery_worker_session() -> Iterator[Any]:
    from celery.contrib.testing.worker import start_worker

    app.loader.import_default_modules()
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    with start_worker(
        app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"
    ) as worker:
        yield worker


@pytest.fixture
def system(configured: str, celery_worker_session: Any) -> Iterator[str]:
    """The running service: a real worker on the real Redis, with the dispatcher ticking."""
    with Ticker(1.0):
        yield configured
