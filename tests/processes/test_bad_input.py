"""Text the store cannot keep, sent through the real worker on SQLite and PostgreSQL (CONTRACT §2.6)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout
from sqlalchemy import func
from sqlmodel import select

from tests.conftest import call, iso, soon
from worker.devtools.sandbox import SandboxAdmin
from worker.runtime.app import app
from worker.store import session_scope
from worker.store.models import History, Meeting

pytestmark = pytest.mark.usefixtures("system")

NUL_RULE = "must not contain the NUL character (U+0000)"


def times(start_in: float = 600, minutes: float = 30) -> dict[str, Any]:
    start = soon(start_in)
    return {"start": iso(start), "end": iso(start + timedelta(minutes=minutes))}


def refused(task: str, **kwargs: Any) -> str:
    """Send `task` as a caller would; it must fail at once with InvalidRequest. Its message."""
    result = app.send_task(task, queue="rooms", kwargs=kwargs)
    with pytest.raises(Exception) as caught:
        result.get(timeout=10)
    assert not isinstance(caught.value, CeleryTimeout)
    # The caller sees the contract's error, not the driver's (psycopg.DataError, UnicodeEncodeError).
    assert type(caught.value).__name__ == "InvalidRequest", repr(caught.value)
    assert result.state == "FAILURE"
    return str(caught.value)


def stored_rows() -> tuple[int, int]:
    """(meetings, history entries) in the store."""
    with session_scope() as session:
        meetings = session.execute(select(func.count()).select_from(Meeting)).scalar_one()
        history = session.execute(select(func.count()).select_from(History)).scalar_one()
        return meetings, history


@pytest.mark.parametrize(
    ("booking_id", "rule"),
    [("booking\x008812", NUL_RULE), ("booking\ud8008812", "lone surrogate (U+D800)")],
    ids=["nul", "surrogate"],
)
def test_unstorable_booking_id_is_refused_naming_it_and_nothing_is_stored(
    sandbox: SandboxAdmin, booking_id: str, rule: str
) -> None:
    message = refused("rooms.schedule_meeting", booking_id=booking_id, **times(start_in=0.5))

    assert message.startswith("booking_id: must not contain")
    assert rule in message
    assert stored_rows() == (0, 0)
    assert sandbox.calls() == []
    # The id without its bad character was not booked either, and the worker goes on serving.
    with pytest.raises(Exception, match="no meeting with booking_id 'booking8812'"):
        call("rooms.get_meeting", booking_id="booking8812")
    assert call("rooms.schedule_meeting", booking_id="booking8812", **times())["state"] == "scheduled"
    assert stored_rows()[0] == 1


@pytest.mark.parametrize("task", ["rooms.get_meeting", "rooms.cancel_meeting"])
def test_reading_or_cancelling_an_unstorable_booking_id_is_the_same_clear_error(task: str) -> None:
    call("rooms.schedule_meeting", booking_id="booking-8812", **times())

    assert refused(task, booking_id="booking-8812\x00") == f"booking_id: {NUL_RULE}"
    assert refused(task, booking_id="\udfffbooking-8812").startswith("booking_id: must not contain a lone")
    # The meeting the caller may have meant is untouched.
    assert call("rooms.get_meeting", booking_id="booking-8812")["state"] == "scheduled"


def test_unstorable_text_in_metadata_notify_or_room_is_refused_naming_its_path(sandbox: SandboxAdmin) -> None:
    message = refused(
        "rooms.schedule_meeting",
        booking_id="booking-8812",
        **times(start_in=0.5),
        room={"room_mode": "group\x00"},
        notify={"task": "bookings.room_event", "queue": "bookings\x00"},
        metadata={"notes": ["\x00"], "ok": "fine"},
    )

    assert message.split("; ") == [
        f"room.room_mode: {NUL_RULE}",
        f"notify.queue: {NUL_RULE}",
        f"metadata.notes.0: {NUL_RULE}",
    ]
    assert stored_rows() == (0, 0)
    assert sandbox.calls() == []


def test_every_other_character_is_stored_and_read_back_as_sent() -> None:
    # The refusal is exactly what the store cannot keep: control characters, noncharacters and
    # astral planes round-trip on both databases.
    text = "ünïcödé \U0001f600 \x01\x1f\x7f \ufffe\uffff"
    view = call("rooms.schedule_meeting", booking_id=text, **times(), metadata={text: [text]})

    assert view["booking_id"] == text
    assert view["metadata"] == {text: [text]}
    assert call("rooms.get_meeting", booking_id=text)["metadata"] == {text: [text]}
