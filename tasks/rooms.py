"""The service's own work on Whereby rooms, sent by the dispatcher with an ETA at the due instant."""

from __future__ import annotations

from worker import service
from worker.app import app


@app.task(name="rooms.create_room")
def create_room(meeting_pk: int, claim: str) -> str:
    return service.create_room(meeting_pk, claim)


@app.task(name="rooms.delete_room")
def delete_room(room_pk: int, claim: str) -> str:
    return service.delete_room(room_pk, claim)
