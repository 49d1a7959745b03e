"""The Celery application: configured from the settings, with the tasks of `tasks/`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    worker_init,
    worker_process_init,
    worker_ready,
)

from config.celery import celery_config
from config.settings import get_settings
from worker.adapters import redact
from worker.runtime import process, resources

app = Celery(
    "roomkeeper",
    include=[
        "tasks.meetings",
        "tasks.rooms",
        "tasks.scheduled",
        "tasks.webhooks",
        "tasks.events",
        "tasks.feeds",
    ],
)
app.config_from_object(celery_config(get_settings()))
# The consumer lets go of the room messages it holds when it stops or loses the broker.
app.steps["consumer"].add("tasks.rooms:HeldMessages")


@worker_init.connect
@beat_init.connect
def _start(**_: Any) -> None:
    process.start()
    # The worker and beat call Whereby: without its key they stop now, naming WHEREBY_API_KEY,
    # instead of failing every call. Importing the app (Flower, the read-only CLI) needs no key.
    get_settings().require_whereby_key()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_room_keys(logger: logging.Logger, **_: Any) -> None:
    # Celery logs each task's result, and a meeting view carries the host room key.
    redact.install(logger)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool child must not reuse the parent's connections, threads or locks.
    resources.reset(settings=False)


@worker_ready.connect
def _dispatch_at_start(**_: Any) -> None:
    # Work that fell due while nothing ran goes out now, not one interval after start-up. Beat
    # does the same in-process (worker.runtime.beat, `run_at_start`); a worker sends it as one task, run
    # by its pool like any other: one row in Flower per worker start, not per tick.
    app.send_task("rooms.dispatch_due", queue=get_settings().queue)
