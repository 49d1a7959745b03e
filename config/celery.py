"""Celery configuration and the beat schedule, derived from the settings."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from config.settings import Settings

# Redis redelivers an unacknowledged message after this long. Every countdown the dispatcher
# uses stays far below it (at most one dispatch interval), so ETAs never trigger redelivery.
VISIBILITY_TIMEOUT_SECONDS = 3600

# Beat entry options read by worker.runtime.beat.InBeatScheduler: run the entry's task in beat's own
# process instead of sending it, and (RUN_AT_START) once more as soon as beat starts.
RUN_IN_BEAT = "run_in_beat"
RUN_AT_START = "run_at_start"

POOLS = {"threads": "worker.runtime.pool:TaskPool"}


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        # The result backend and the broker must agree, or results outlive their messages oddly.
        "result_backend_transport_options": transport_options,
        "result_expires": 24 * 3600,
        "result_extended": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # At-least-once: a message is acknowledged only after its task ran, and a worker that dies
        # mid-task gives its message back. The store's claims make the second run a no-op.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_queues": [Queue(settings.queue)],
        "task_create_missing_queues": True,
        "task_soft_time_limit": settings.task_time_limit_seconds,
        "task_time_limit": settings.hard_time_limit_seconds,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        # `threads` is Celery's threads pool with deletions ahead of creations (worker/runtime/pool.py).
        "worker_pool": POOLS.get(settings.worker_pool, settings.worker_pool),
        "worker_concurrency": settings.worker_concurrency,
        # Beat keeps no schedule file: the database holds the schedule, and a restarted beat
        # should dispatch at once rather than wait out an interval it remembers. This subclass of
        # celery.beat:Scheduler runs the `RUN_IN_BEAT` entries in beat's own process.
        "beat_scheduler": "worker.runtime.beat:InBeatScheduler",
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    # Every entry runs inside beat (worker.runtime.beat): a tick that finds nothing to do leaves no trace in
    # the broker or in Flower, and only the work it finds is sent. The queue and expiry say how an
    # entry would be sent by a stock scheduler (`celery beat -S celery.beat:Scheduler`).
    # The reconciler runs in beat too, though it calls Whereby and can take a while: as a task it
    # would put 12 rows an hour into Flower, most of a 15-row page after an idle hour, and its
    # thread keeps it off beat's loop; what it finds and repairs is in beat's log.
    def entry(task: str, every: float, at_start: bool = False) -> dict[str, Any]:
        options = {"queue": settings.queue, "expires": every, RUN_IN_BEAT: True, RUN_AT_START: at_start}
        return {"task": task, "schedule": every, "options": options}

    return {
        "dispatch-due-work": entry("rooms.dispatch_due", settings.dispatch_interval_seconds, at_start=True),
        "recover-overdue-work": entry("rooms.recover_overdue", settings.recover_interval_seconds),
        "reconcile-with-whereby": entry("rooms.reconcile", settings.reconcile_interval_seconds),
        "apply-stored-webhooks": entry("rooms.sweep_webhooks", settings.recover_interval_seconds),
        # Retries of events to notify URLs that wait in the store, and chains whose run died.
        "deliver-due-events": entry("rooms.dispatch_deliveries", settings.dispatch_interval_seconds),
        # Calendar feeds: the pass finds the feeds due and sends one `feeds.sync` task for each.
        "poll-feeds": entry("feeds.poll_due", min(30.0, settings.feed_poll_interval_seconds), at_start=True),
        # Retention: finished bookings and long-delivered events, pruned in short batches.
        "prune-old-rows": entry("rooms.prune", settings.prune_interval_seconds),
    }
