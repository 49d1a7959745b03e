"""The naive recipe roomkeeper is compared with: one Celery task per meeting with an `eta`.

`book()` sends `naive.create_room` with eta = start - lead and `naive.delete_room` with eta = end.
The tasks use roomkeeper's own Whereby client and worker settings (acks_late, reject on worker
lost, prefetch 1, threads pool), keep booking -> meeting id in the Redis hash `naive:rooms`, and
retry Whereby's retryable errors with Celery's `autoretry_for`. Every run adds one to
`naive:executions:<create_room|delete_room>` (and every retry to `naive:retries:<task>`) for its
booking, so duplicate executions can be counted. Run it with
`celery -A bench.naive worker --pool threads`; it reads its settings from the environment:

    NAIVE_BROKER_URL            broker and result backend (default redis://127.0.0.1:6379/0)
    NAIVE_CONCURRENCY           threads (default 16, roomkeeper's default)
    NAIVE_VISIBILITY_TIMEOUT    kombu's visibility_timeout in seconds (default 3600, roomkeeper's)
    NAIVE_RESTORE_INTERVAL      if set: kombu's unacked_restore_interval, with a throttle of 1
    WHEREBY_API_URL, WHEREBY_API_KEY, WHEREBY_TIMEOUT_SECONDS
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery, Task
from kombu import Queue

from config.settings import DEFAULT_WHEREBY_API_URL, SANDBOX_API_KEY
from worker.adapters.whereby import (
    APIConnectionError,
    CreateMeetingRequest,
    RateLimitedError,
    ServerError,
    WherebyClient,
)

log = logging.getLogger(__name__)

QUEUE = "naive"
CREATE_TASK = "naive.create_room"
DELETE_TASK = "naive.delete_room"
TASKS = (CREATE_TASK, DELETE_TASK)
ROOMS_KEY = "naive:rooms"
EXECUTIONS_KEY = "naive:executions:{task}"  # task: create_room | delete_room
RETRIES_KEY = "naive:retries:{task}"
ROOM_PREFIX = "nv-"
# What a user retries: the client's retryable errors (transport, 5xx, 429), with backoff.
RETRY_ON = (APIConnectionError, ServerError, RateLimitedError)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def broker_url() -> str:
    return os.environ.get("NAIVE_BROKER_URL") or "redis://127.0.0.1:6379/0"


def transport_options() -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": _env_int("NAIVE_VISIBILITY_TIMEOUT", 3600)}
    restore_interval = _env_int("NAIVE_RESTORE_INTERVAL", 0)
    if restore_interval > 0:
        # kombu sweeps every interval x throttle seconds (10 x 10 by default); throttle 1 makes
        # the interval the sweep period.
        options.update(unacked_restore_interval=restore_interval, unacked_restore_throttle=1)
    return options


def room_prefix(booking_id: str) -> str:
    """Whereby's roomNamePrefix for a booking: lower-case [a-z0-9-], well under 39 characters."""
    return ROOM_PREFIX + hashlib.sha256(booking_id.encode()).hexdigest()[:16] + "-"


app = Celery("naive")
app.conf.update(
    broker_url=broker_url(),
    result_backend=broker_url(),
    broker_connection_retry_on_startup=True,
    broker_transport_options=transport_options(),
    result_backend_transport_options=transport_options(),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE)],
    worker_hijack_root_logger=False,
    worker_pool="threads",
    worker_concurrency=_env_int("NAIVE_CONCURRENCY", 16),
)

# One Whereby client and one Redis client per worker process, shared by its threads.
_lock = threading.Lock()
_client: WherebyClient | None = None
_redis: redis.Redis | None = None


def get_client() -> WherebyClient:
    global _client
    with _lock:
        if _client is None:
            _client = WherebyClient(
                os.environ.get("WHEREBY_API_URL") or DEFAULT_WHEREBY_API_URL,
                os.environ.get("WHEREBY_API_KEY") or SANDBOX_API_KEY,
                timeout=float(os.environ.get("WHEREBY_TIMEOUT_SECONDS") or 10.0),
            )
        return _client


def get_redis() -> redis.Redis:
    global _redis
    with _lock:
        if _redis is None:
            _redis = redis.Redis.from_url(broker_url(), decode_responses=True)
        return _redis


# What a typical user gives such tasks: Celery's own retries with exponential backoff and jitter.
RETRYING: dict[str, Any] = {
    "bind": True,
    "autoretry_for": RETRY_ON,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 5,
}


def _count(task: Task, short_name: str, booking_id: str) -> None:
    store = get_redis()
    store.hincrby(EXECUTIONS_KEY.format(task=short_name), booking_id, 1)
    if task.request.retries:
        store.hincrby(RETRIES_KEY.format(task=short_name), booking_id, 1)


@app.task(name=CREATE_TASK, **RETRYING)
def create_room(self: Task, booking_id: str, start: str, end: str) -> dict[str, str]:
    """Create the booking's room, ending at `end`, and remember its meeting id."""
    _count(self, "create_room", booking_id)
    request = CreateMeetingRequest(
        end_date=datetime.fromisoformat(end), room_name_prefix=room_prefix(booking_id)
    )
    meeting = get_client().create_meeting(request)
    get_redis().hset(ROOMS_KEY, booking_id, meeting.meeting_id)
    log.info("booking %s (start %s): room %s created", booking_id, start, meeting.meeting_id)
    return {"booking_id": booking_id, "meeting_id": meeting.meeting_id, "room_url": meeting.room_url}


@app.task(name=DELETE_TASK, **RETRYING)
def delete_room(self: Task, booking_id: str) -> dict[str, Any]:
    """Delete the room `create_room` remembered for this booking (a 404 means it is gone already)."""
    _count(self, "delete_room", booking_id)
    store = get_redis()
    meeting_id = store.hget(ROOMS_KEY, booking_id)
    if meeting_id is None:
        log.warning("booking %s: no room to delete", booking_id)
        return {"booking_id": booking_id, "meeting_id": None, "deleted": False}
    deleted = get_client().delete_meeting(str(meeting_id))
    store.hdel(ROOMS_KEY, booking_id)
    return {"booking_id": booking_id, "meeting_id": meeting_id, "deleted": deleted}


def book(
    caller: Celery | Callable[..., Any],
    booking_id: str,
    start: datetime,
    end: datetime,
    lead_seconds: float,
) -> tuple[Any, Any]:
    """The recipe: a create task due `lead_seconds` before `start` and a delete task due at `end`.

    `caller` is a Celery app (its `send_task` is used, by name, so the caller need not import
    this module's tasks) or a `send_task`-like callable. Returns what the two sends returned.
    """
    send = caller.send_task if isinstance(caller, Celery) else caller
    create = send(
        CREATE_TASK,
        kwargs={"booking_id": booking_id, "start": start.isoformat(), "end": end.isoformat()},
        eta=start - timedelta(seconds=lead_seconds),
        queue=QUEUE,
    )
    delete = send(DELETE_TASK, kwargs={"booking_id": booking_id}, eta=end, queue=QUEUE)
    return create, delete
