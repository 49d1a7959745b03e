"""The service's own work on Whereby rooms, sent by the dispatcher with an ETA at the due instant.

Nobody waits on these tasks, so their results are not stored: that saves the result backend three
Redis round trips a task (started, the done check, done). Flower still shows each outcome, which
travels in the task's succeeded or failed event. A failed Whereby call raises WherebyCallFailed
once the store holds its retry: FAILURE with the reason in Flower, no worker slot sleeping.

The message's arguments are its wire format (`worker/jobs/dispatch.py` sends them, and messages
already queued during an upgrade carry them): `meeting_pk` is the meeting row's id (`meeting_id`
everywhere past this face), `room_pk` a room row's (`room_id`), `claim` the dispatcher's claim.
`booking_id` is not read by the work: the row holds it. It rides along so that Flower, which shows
a task's arguments, names the booking each room task is about (`tests/processes/test_flower_quiet.py`).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.signals import task_received

from worker.jobs import creation, deletion
from worker.jobs.call_failures import WherebyCallFailed
from worker.runtime.app import app
from worker.store import claims
from worker.store.models import Meeting, Room


@app.task(name="rooms.create_room", ignore_result=True, throws=(WherebyCallFailed,))
def create_room(meeting_pk: int, claim: str, booking_id: str = "") -> str:
    return creation.create_room(meeting_id=meeting_pk, claim=claim)


@app.task(name="rooms.delete_room", ignore_result=True, throws=(WherebyCallFailed,))
def delete_room(room_pk: int, claim: str, booking_id: str = "") -> str:
    return deletion.delete_room(room_id=room_pk, claim=claim)


_HELD: dict[str, tuple[type[Meeting] | type[Room], str]] = {
    "rooms.create_room": (Meeting, "meeting_pk"),
    "rooms.delete_room": (Room, "room_pk"),
}


@task_received.connect
def _hold_while_waiting(request: Any = None, **_: Any) -> None:
    # A received room message may wait here for its ETA or a free thread; its row's lease is kept
    # alive meanwhile, so the dispatcher sends it again only if this worker dies (worker/store/claims.py).
    held = _HELD.get(getattr(request, "name", ""))
    if held is not None:
        model, argument = held
        kwargs = request.kwargs or {}
        row_id, claim = kwargs.get(argument), kwargs.get("claim")
        if isinstance(row_id, int) and isinstance(claim, str):
            claims.message_received(model, row_id, claim)


class HeldMessages(bootsteps.StartStopStep):
    """The worker's consumer lets go of the messages it holds when it stops: on shutdown, and when
    it loses the broker (Celery then drops the ETA messages it was waiting on, and the broker may
    have lost them too). Their leases then lapse, and the dispatcher sends them again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, parent: Any) -> None:
        claims.renewer.release_messages()

    def shutdown(self, parent: Any) -> None:
        claims.renewer.release_messages()
