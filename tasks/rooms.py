"""The service's own work on Whereby rooms, sent by the dispatcher with an ETA at the due instant.

Nobody waits on these tasks, so their results are not stored: that saves the result backend three
Redis round trips a task (started, the done check, done). Flower still shows each outcome, which
travels in the task-succeeded event."""

from __future__ import annotations

from worker import service
from worker.app import app


@app.task(name="rooms.create_room", ignore_result=True)
def create_room(meeting_pk: int, claim: str) -> str:
    return service.create_room(meeting_pk, claim)


@app.task(name="rooms.delete_room", ignore_result=True)
def delete_room(room_pk: int, claim: str) -> str:
    return service.delete_room(room_pk, claim)
