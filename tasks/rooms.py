"""The service's own work on Whereby rooms, sent by the dispatcher with an ETA at the due instant.

Nobody waits on these tasks, so their results are not stored: that saves the result backend three
Redis round trips a task (started, the done check, done). Flower still shows each outcome, which
travels in the task's succeeded or failed event. `booking_id` rides along only so that an operator
can tell in Flower which booking a row is about. A failed Whereby call raises WherebyCallFailed
once the store holds its retry: FAILURE with the reason in Flower, no worker slot sleeping.
"""

from __future__ import annotations

from worker import creation, deletion
from worker.app import app
from worker.errors import WherebyCallFailed


@app.task(name="rooms.create_room", ignore_result=True, throws=(WherebyCallFailed,))
def create_room(meeting_pk: int, claim: str, booking_id: str = "") -> str:
    return creation.create_room(meeting_pk, claim)


@app.task(name="rooms.delete_room", ignore_result=True, throws=(WherebyCallFailed,))
def delete_room(room_pk: int, claim: str, booking_id: str = "") -> str:
    return deletion.delete_room(room_pk, claim)
