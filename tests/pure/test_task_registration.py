"""Snapshot of the task names other applications and beat send by name: a rename cannot slip through."""

from __future__ import annotations

from kombu.utils.imports import symbol_by_name

from config.celery import RUN_AT_START, RUN_IN_BEAT
from worker.runtime.app import app
from worker.runtime.beat import InBeatScheduler

EXPECTED_TASKS = {
    "rooms.schedule_meeting",
    "rooms.cancel_meeting",
    "rooms.get_meeting",
    "rooms.create_room",
    "rooms.delete_room",
    "rooms.dispatch_due",
    "rooms.recover_overdue",
    "rooms.reconcile",
    "rooms.apply_webhooks",
    "rooms.sweep_webhooks",
    "rooms.schedule_meetings",
    "rooms.deliver_events",
    "rooms.dispatch_deliveries",
    "rooms.prune",
    "feeds.poll_due",
    "feeds.sync",
}


def test_registered_task_names() -> None:
    app.loader.import_default_modules()
    registered = {name for name in app.tasks if not name.startswith("celery.")}
    assert registered == EXPECTED_TASKS


def test_beat_runs_registered_tasks_in_its_own_process() -> None:
    """Beat calls its ticks by their registered names, in-process; senders may still use the names."""
    app.loader.import_default_modules()
    schedule = app.conf.beat_schedule
    scheduled = {entry["task"] for entry in schedule.values()}
    assert scheduled == {
        "rooms.dispatch_due",
        "rooms.recover_overdue",
        "rooms.reconcile",
        "rooms.sweep_webhooks",
        "rooms.dispatch_deliveries",
        "rooms.prune",
        "feeds.poll_due",
    }
    assert scheduled <= set(app.tasks)
    assert symbol_by_name(app.conf.beat_scheduler) is InBeatScheduler
    in_beat = {entry["task"] for entry in schedule.values() if entry["options"].get(RUN_IN_BEAT)}
    assert in_beat == scheduled, "a tick sent as a task fills Flower's task list"
    at_start = {entry["task"] for entry in schedule.values() if entry["options"].get(RUN_AT_START)}
    assert at_start == {"rooms.dispatch_due", "feeds.poll_due"}
