"""Snapshot of the task names other applications and beat send by name: a rename cannot slip through."""

from __future__ import annotations

from worker.app import app

EXPECTED_TASKS = {
    "rooms.schedule_meeting",
    "rooms.cancel_meeting",
    "rooms.get_meeting",
    "rooms.create_room",
    "rooms.delete_room",
    "rooms.dispatch_due",
    "rooms.recover_overdue",
    "rooms.reconcile",
}


def test_registered_task_names() -> None:
    app.loader.import_default_modules()
    registered = {name for name in app.tasks if not name.startswith("celery.")}
    assert registered == EXPECTED_TASKS


def test_beat_sends_registered_tasks() -> None:
    app.loader.import_default_modules()
    scheduled = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert scheduled == {"rooms.dispatch_due", "rooms.recover_overdue", "rooms.reconcile"}
    assert scheduled <= set(app.tasks)
