"""Applying Whereby's webhooks (stored by the web process) to who is in each room (CONTRACT §4.3)."""

from __future__ import annotations

from worker.jobs import occupancy
from worker.runtime.app import app


@app.task(name="rooms.apply_webhooks", ignore_result=True)
def apply_webhooks(whereby_id: str) -> str:
    return occupancy.apply_room_events(whereby_id)
