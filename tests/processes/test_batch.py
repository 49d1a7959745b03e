"""Many bookings at once (worker/jobs/batch.py, `rooms.schedule_meetings`): each item on its own, good
ones stored and bad ones not, a chunk stored whole or not at all, one dispatch per batch, the same
rules as one booking at a time; on SQLite and PostgreSQL, through the real worker where it matters."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout
from sqlmodel import col, select

from tests.conftest import call, iso, soon, wait_for
from worker.jobs import batch, booking
from worker.rules.validation import InvalidRequest, ScheduleRequest
from worker.store import journal, persist, session_scope
from worker.store.models import History, Meeting


def item(booking_id: str, days: float = 1, minutes: float = 30, **extra: Any) -> dict[str, Any]:
    start = soon(days * 86400)
    return {
        "booking_id": booking_id,
        "start": iso(start),
        "end": iso(start + timedelta(minutes=minutes)),
        **extra,
    }


def stored() -> dict[str, Meeting]:
    with session_scope() as session:
        return {m.booking_id: m for m in session.execute(select(Meeting)).scalars()}


def actions(booking_id: str) -> list[str]:
    with session_scope() as session:
        query = select(History).where(History.booking_id == booking_id).order_by(col(History.id))
        return [f"{h.kind}:{h.action}" for h in session.execute(query).scalars()]


def test_good_items_are_stored_and_bad_ones_are_not(configured: str) -> None:
    items: list[Any] = [
        item("a", metadata={"n": 1}),
        item("b", minutes=-5),
        None,
        item("c", room={"room_mode": "huge"}, colour="red"),
        item("d", room={"room_mode": "group", "fields": ["hostRoomUrl"]}),
        item("a"),
        item("x" * 201),
    ]
    results = batch.schedule_many(items)
    assert [r["ok"] for r in results] == [True, False, False, False, True, False, False]
    assert results[0] == {"ok": True, "created": True, "view": results[0]["view"]}
    assert results[0]["view"]["metadata"] == {"n": 1} and results[0]["view"]["state"] == "scheduled"
    assert results[1]["errors"] == [{"field": "end", "rule": "must be after start"}]
    assert results[2]["errors"] == [{"field": "", "rule": "each booking must be a JSON object"}]
    assert {e["field"] for e in results[3]["errors"]} == {"room.room_mode", "colour"}
    assert (
        results[5]["errors"][0]["field"] == "booking_id"
        and "first as item 0" in results[5]["errors"][0]["rule"]
    )
    assert results[6]["errors"][0]["field"] == "booking_id"
    rows = stored()
    assert set(rows) == {"a", "d"}
    assert rows["d"].room_options == {"room_mode": "group", "fields": ["hostRoomUrl"]}
    assert actions("a") == ["state:booked"] and actions("b") == [] and actions("c") == []


def test_an_item_is_stored_as_the_single_booking_would_be(configured: str) -> None:
    same = {"room": {"room_mode": "group"}, "metadata": {"k": "v"}, "notify": {"task": "t", "queue": "q"}}
    single = booking.schedule_meeting(ScheduleRequest.model_validate(item("single", **same)))
    (many,) = batch.schedule_many([item("many", **same)])
    ignore = {"booking_id", "created_at", "updated_at", "start", "end"}
    assert {k: v for k, v in many["view"].items() if k not in ignore} == {
        k: v for k, v in single.items() if k not in ignore
    }
    rows = stored()
    for column in ("state", "room_options", "notify", "meta", "due_at", "attempts", "replacing", "room_id"):
        a, b = getattr(rows["single"], column), getattr(rows["many"], column)
        if column == "due_at":
            assert a is not None and b is not None and abs(a - b) < timedelta(seconds=5)
        else:
            assert a == b, column
    assert actions("single") == actions("many") == ["state:booked"]


def test_existing_bookings_go_through_the_reschedule_rule(configured: str) -> None:
    batch.schedule_many([item("kept"), item("ended")])
    booking.cancel_meeting("ended")
    results = batch.schedule_many([item("kept", days=2), item("ended", days=3), item("new")])
    assert [(r["ok"], r["created"]) for r in results] == [(True, False), (True, False), (True, True)]
    assert results[1]["view"]["state"] == "scheduled"  # booked again after its cancellation
    assert actions("ended") == [
        "state:booked",
        "state:scheduled -> cancelled",
        "state:rescheduled",
        "state:cancelled -> scheduled",
    ]
    assert stored()["kept"].start > soon(1.5 * 86400)


def test_a_chunk_is_stored_whole_or_not_at_all(configured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch.schedule_many([item("before")])
    real = journal.note

    def failing(session: Any, booking_id: str, *args: Any) -> None:
        if booking_id == "n-250":
            raise RuntimeError("the store went away mid-chunk")
        real(session, booking_id, *args)

    monkeypatch.setattr(journal, "note", failing)
    items = [item(f"n-{i:03d}") for i in range(300)] + [item("before", days=5)]
    with pytest.raises(RuntimeError):
        batch.schedule_many(items)
    rows = stored()
    # The first chunk (200 items) committed; the second, holding n-250, left nothing behind.
    assert {f"n-{i:03d}" for i in range(batch.CHUNK)} <= set(rows)
    assert not any(f"n-{i:03d}" in rows for i in range(batch.CHUNK, 300))
    assert actions("n-250") == [] and actions("n-299") == []
    assert rows["before"].start < soon(2 * 86400), "the reschedule in the failed chunk was rolled back"


def test_a_thousand_items_in_order_with_one_dispatch(
    configured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatched: list[set[int]] = []
    monkeypatch.setattr(
        persist, "dispatch_due", lambda meeting_ids, room_ids: dispatched.append(set(meeting_ids))
    )
    # Every third item starts within the lead time: its room is due at once.
    items = [item(f"k-{i:04d}", days=(0.00001 if i % 3 == 0 else 1)) for i in range(batch.MAX_ITEMS)]
    results = batch.schedule_many(items)
    assert [r["view"]["booking_id"] for r in results] == [f"k-{i:04d}" for i in range(batch.MAX_ITEMS)]
    assert len(stored()) == batch.MAX_ITEMS
    assert len(dispatched) == 1, "one dispatch for the whole batch"
    due_now = {m.id for m in stored().values() if m.booking_id in {f"k-{i:04d}" for i in range(0, 1000, 3)}}
    assert dispatched[0] == due_now


def test_two_batches_racing_for_the_same_new_ids(configured: str) -> None:
    ids = [f"race-{i}" for i in range(50)]
    answers: list[list[dict[str, Any]]] = []
    errors: list[BaseException] = []

    def send(days: float) -> None:
        try:
            answers.append(batch.schedule_many([item(b, days=days) for b in ids]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(d,)) for d in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(r["ok"] for answer in answers for r in answer)
    created = [sum(r["created"] for r in answer) for answer in answers]
    assert sorted(created) == [0, 0, 50], "each id created once, rescheduled by the others"
    assert len(stored()) == 50


# --------------------------------------------------------------------------------------------
# Through the real worker: `rooms.schedule_meetings`.


def test_the_task_answers_each_item_and_rooms_follow(system: str, sandbox: Any) -> None:
    soon_start = soon(2)
    items = [
        {"booking_id": f"t-{i}", "start": iso(soon_start), "end": iso(soon_start + timedelta(seconds=60))}
        for i in range(3)
    ] + [{"booking_id": "t-bad", "start": iso(soon_start), "end": "never"}]
    results = call("rooms.schedule_meetings", bookings=items)
    assert [r["ok"] for r in results] == [True, True, True, False]
    assert results[3]["errors"][0]["field"] == "end"
    wait_for(
        lambda: all(call("rooms.get_meeting", booking_id=f"t-{i}")["state"] == "ready" for i in range(3))
    )
    assert len(sandbox.rooms(include_deleted=False)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bookings": [{}] * 1001}, "bookings: List should have at most 1000 items"),
        ({"bookings": [], "wait": True}, "wait: unknown field"),
        ({}, "bookings: is required"),
        ({"bookings": {"a": 1}}, "bookings: Input should be a valid list"),
    ],
)
def test_the_task_refuses_a_bad_call(system: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        call("rooms.schedule_meetings", **kwargs)
    assert stored() == {}


def test_the_task_takes_keyword_arguments_only(system: str) -> None:
    from worker.runtime.app import app

    with pytest.raises((InvalidRequest, CeleryTimeout), match="keyword arguments"):
        app.send_task("rooms.schedule_meetings", args=[[item("p")]], queue="rooms").get(timeout=15)
