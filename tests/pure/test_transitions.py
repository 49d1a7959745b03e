"""The transitions of worker/rules/meetings.py as tables of state by input: no database, Celery or HTTP.

Each table states what the contract (CONTRACT §2) asks for in every meeting state; the invariants
at the end run every rule against every state and room shape.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from config.settings import Settings
from worker.adapters import whereby
from worker.rules import meetings
from worker.store.models import MeetingState, RoomState

S = MeetingState
NOW = datetime(2096, 3, 1, 12, 0, tzinfo=UTC)
SOON, LATER, PAST = NOW + timedelta(minutes=10), NOW + timedelta(hours=1), NOW - timedelta(minutes=1)
ALL = list(MeetingState)
TERMINAL = {S.ENDED, S.CANCELLED, S.FAILED}
ROOM_ID = 7


@pytest.fixture(autouse=True)
def _sandbox_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHEREBY_API_URL", "http://127.0.0.1:8088/v1")
    monkeypatch.delenv("WHEREBY_API_KEY", raising=False)


def settings(**overrides: Any) -> Settings:
    return Settings(**{"max_attempts": 4, "retry_base_seconds": 2.0, "retry_max_seconds": 60.0, **overrides})


def meeting(state: MeetingState, **fields: Any) -> meetings.MeetingFacts:
    values: dict[str, Any] = {"create_at": NOW - timedelta(minutes=15), "room_end": LATER, "due_at": None}
    if state in (S.READY, S.DELETING):
        values["room_id"] = ROOM_ID
    if state in (S.SCHEDULED, S.CREATING):
        values["due_at"] = NOW
    values.update(fields)
    return meetings.MeetingFacts(state=state, **values)


def room(state: RoomState = RoomState.LIVE, **fields: Any) -> meetings.RoomFacts:
    values: dict[str, Any] = {"id": ROOM_ID, "end_date": LATER, "due_at": LATER, "whereby_id": "4242"}
    values.update(fields)
    return meetings.RoomFacts(state=state, **values)


def error(status: int) -> whereby.WherebyError:
    return whereby.make_status_error(httpx.Response(status, json={"error": "nope"}))


# --------------------------------------------------------------------------------------------
# The caller's inputs.


@pytest.mark.parametrize("state", ALL)
def test_cancelled(state: MeetingState) -> None:
    change = meetings.cancelled(meeting(state), room() if state in (S.READY, S.DELETING) else None, NOW)
    if state in (S.ENDED, S.CANCELLED):
        assert change == meetings.NOTHING  # cancelling again is not an error, and changes nothing
        return
    assert change.state == S.CANCELLED
    assert change.meeting["due_at"] is None and change.meeting["claim_token"] is None
    assert change.retire_replaced == NOW  # no replacement is coming: waiting rooms go too
    if state in (S.READY, S.DELETING):
        assert change.room == {"due_at": NOW, "retired_reason": "cancelled"}  # deleted now
    else:
        assert change.room == {}
    assert not change.act and change.event is None  # room.deleted comes when Whereby confirms


@pytest.mark.parametrize("state", ALL)
def test_rescheduled_without_a_room(state: MeetingState) -> None:
    new_create = NOW + timedelta(minutes=5)
    change = meetings.rescheduled(meeting(state, create_at=new_create, room_id=None), None, LATER, NOW)
    assert change.meeting["due_at"] == new_create and change.meeting["attempts"] == 0
    expected = {
        S.SCHEDULED: None,
        S.CREATING: S.SCHEDULED,  # its creation is not due any more
        S.READY: None,
        S.DELETING: None,
        S.ENDED: S.SCHEDULED,  # booked again
        S.CANCELLED: S.SCHEDULED,
        S.FAILED: S.SCHEDULED,
    }
    assert change.state == expected[state]
    if state in TERMINAL:
        assert change.meeting["room_id"] is None and change.meeting["last_error"] is None


@pytest.mark.parametrize("state", [S.READY, S.DELETING])
@pytest.mark.parametrize("covered", [True, False])
def test_rescheduled_with_a_room(state: MeetingState, covered: bool) -> None:
    new_end = LATER - timedelta(minutes=10) if covered else LATER + timedelta(minutes=10)
    change = meetings.rescheduled(meeting(state, room_end=new_end, create_at=SOON), room(), LATER, NOW)
    if covered:  # the room and its URLs are kept; only its deletion moves
        assert change.room == {"due_at": new_end, "overrun_since": None}
        assert change.state == (S.READY if state == S.DELETING else None)
        assert "room_id" not in change.meeting
    else:  # a new room replaces it: old one retired, the meeting waits for its new room
        assert change.state == S.SCHEDULED
        assert change.meeting["room_id"] is None and change.meeting["replacing"] is True
        assert change.room["retired_reason"] == "replaced"
        assert change.room["due_at"] == NOW  # the new room is not due now: the old goes at once


@pytest.mark.parametrize("state", ALL)
def test_retried_by_an_operator(state: MeetingState) -> None:
    assert meetings.retried(meeting(state), NOW).state == (S.SCHEDULED if state == S.FAILED else None)
    over = meetings.retried(meeting(state, room_end=PAST), NOW)
    assert over.state is None
    assert (over.note is not None) == (state == S.FAILED)


# --------------------------------------------------------------------------------------------
# Creating a room.


@pytest.mark.parametrize("state", ALL)
def test_creation_due(state: MeetingState) -> None:
    change = meetings.creation_due(meeting(state, due_at=NOW, attempts=2), NOW)
    if state in (S.SCHEDULED, S.CREATING):
        assert change.act and change.state == S.CREATING and change.meeting == {"attempts": 3}
    else:
        assert not change.act and change.state is None and change.meeting == meetings.RELEASE


@pytest.mark.parametrize("replacing", [False, True])
def test_creation_due_after_the_end_makes_no_room(replacing: bool) -> None:
    change = meetings.creation_due(meeting(S.CREATING, room_end=PAST, replacing=replacing), NOW)
    assert not change.act
    assert (change.state, change.event) == (
        (S.ENDED, "room.deleted") if replacing else (S.FAILED, "room.failed")
    )


def test_creation_not_due_yet_lets_go() -> None:
    change = meetings.creation_due(meeting(S.SCHEDULED, due_at=NOW + timedelta(seconds=30)), NOW)
    assert not change.act and change.meeting == meetings.RELEASE


@pytest.mark.parametrize("state", ALL)
@pytest.mark.parametrize("replacing", [False, True])
def test_room_made(state: MeetingState, replacing: bool) -> None:
    facts = meeting(state, room_id=None, replacing=replacing)
    made = room(RoomState.PENDING, due_at=None)
    change = meetings.room_made(facts, made, NOW, settings(), holds=True)
    if state == S.CREATING:
        assert change.state == S.READY
        assert change.meeting["room_id"] == ROOM_ID and change.room["due_at"] == LATER
        assert change.room["state"] == RoomState.LIVE
        assert change.event == ("room.replaced" if replacing else "room.ready")
        assert change.retire_replaced == (NOW if replacing else None)
    else:  # cancelled or moved on while Whereby made it: it must not live on
        assert change.state is None and change.event is None
        assert change.room["retired_reason"] == "unwanted" and change.room["due_at"] == NOW


def test_room_made_for_a_late_finisher_changes_nothing() -> None:
    change = meetings.room_made(
        meeting(S.CREATING), room(RoomState.PENDING), NOW, settings(), holds=False, taken_over=True
    )
    assert change.state is None and change.room == {} and change.meeting == {}


@pytest.mark.parametrize("attempts", [1, 4])
def test_room_made_too_short_for_a_later_end(attempts: int) -> None:
    facts = meeting(S.CREATING, room_end=LATER + timedelta(minutes=5), attempts=attempts)
    change = meetings.room_made(facts, room(RoomState.PENDING), NOW, settings(), holds=True)
    assert change.room["retired_reason"] == "replaced" and change.room["due_at"] == NOW
    if attempts < 4:
        assert change.state is None and change.meeting["due_at"] == NOW  # make another now
    else:
        assert change.state == S.FAILED and change.event == "room.failed"


@pytest.mark.parametrize(("status", "gives_up"), [(400, True), (403, True), (503, False), (429, False)])
def test_create_failed(status: int, gives_up: bool) -> None:
    change = meetings.create_failed(
        meeting(S.CREATING, attempts=1), error(status), NOW, settings(), holds=True
    )
    if gives_up:  # sending the same request again cannot help
        assert change.state == S.FAILED and change.event == "room.failed"
        assert change.meeting["due_at"] is None
    else:
        assert change.state is None and change.meeting["due_at"] > NOW
    assert change.meeting["attempts"] == (0 if status == 429 else 1)  # a 429 is not the meeting's fault
    assert not meetings.create_failed(
        meeting(S.CREATING), error(status), NOW, settings(), holds=False
    ).meeting


@pytest.mark.parametrize("state", [s for s in ALL if s != S.CREATING])
def test_create_failed_after_the_meeting_moved_on_only_lets_go(state: MeetingState) -> None:
    """Rescheduled (back to scheduled) or cancelled during the call: its own due instant stands."""
    change = meetings.create_failed(meeting(state), error(503), NOW, settings(), holds=True)
    assert change.state is None and change.meeting == meetings.RELEASE and change.event is None


@pytest.mark.parametrize("holds", [True, False])
@pytest.mark.parametrize("state", [S.CREATING, S.SCHEDULED])
@pytest.mark.parametrize(
    ("status", "looked_up", "abandoned"),
    [
        (400, False, True),  # refused: Whereby made nothing, and no earlier attempt may have
        (429, False, True),
        (503, False, False),  # a 5xx may have made the room: the next attempt looks it up
        (400, True, False),  # an earlier attempt's room may exist: never abandoned here
        (503, True, False),
    ],
)
def test_create_failed_abandons_the_attempts_room_only_when_whereby_surely_made_none(
    status: int, looked_up: bool, abandoned: bool, state: MeetingState, holds: bool
) -> None:
    change = meetings.create_failed(
        meeting(state, attempts=1), error(status), NOW, settings(), holds=holds, looked_up=looked_up
    )
    assert change.room == ({"state": RoomState.ABANDONED} if abandoned else {})


# --------------------------------------------------------------------------------------------
# Deleting a room (the end reached).


@pytest.mark.parametrize("state", ALL)
def test_deletion_due(state: MeetingState) -> None:
    change = meetings.deletion_due(meeting(state, room_id=ROOM_ID), room(due_at=NOW), NOW)
    assert change.act
    assert change.state == (S.DELETING if state == S.READY else None)
    skipped = meetings.deletion_due(meeting(state), room(RoomState.DELETED, due_at=NOW), NOW)
    assert not skipped.act and skipped.room == meetings.RELEASE


@pytest.mark.parametrize("state", ALL)
@pytest.mark.parametrize("current", [True, False])
def test_room_deleted(state: MeetingState, current: bool) -> None:
    facts = meeting(state, room_id=ROOM_ID if current else None)
    change = meetings.room_deleted(facts, room(due_at=NOW), NOW, existed=True)
    assert change.room["state"] == RoomState.DELETED
    if not current:  # a replaced or unwanted room: the meeting is not concerned
        assert change.state is None and change.event is None and change.meeting == {}
        return
    assert change.meeting["room_id"] is None and change.event == "room.deleted"
    assert change.state == (S.ENDED if state in (S.READY, S.DELETING) else None)


def test_room_deleted_just_before_a_reschedule_is_replaced() -> None:
    change = meetings.room_deleted(meeting(S.READY), room(due_at=LATER), NOW, existed=True)
    assert change.state == S.CREATING and change.meeting["replacing"] is True
    assert change.meeting["due_at"] == NOW and change.event is None


def test_delete_failed_is_retried_for_ever() -> None:
    change = meetings.delete_failed(meeting(S.DELETING), room(), 50, error(503), NOW, settings(), holds=True)
    assert change.room["attempts"] == 51 and change.room["due_at"] > NOW
    assert change.state is None and change.event is None


# --------------------------------------------------------------------------------------------
# What the reconciler finds.


@pytest.mark.parametrize("state", ALL)
@pytest.mark.parametrize("end", [LATER, PAST])
def test_room_lost(state: MeetingState, end: datetime) -> None:
    change = meetings.room_lost(meeting(state, room_id=ROOM_ID, room_end=end), room(), NOW)
    assert change.room["state"] == RoomState.DELETED and change.meeting["room_id"] is None
    if state in (S.READY, S.DELETING):
        assert (change.state, change.event) == (
            (S.CREATING, None) if end > NOW else (S.ENDED, "room.deleted")
        )
    else:
        assert change.state is None
        assert change.event == ("room.deleted" if state == S.CANCELLED else None)


@pytest.mark.parametrize("state", ALL)
def test_attempt_adopted(state: MeetingState) -> None:
    change = meetings.attempt_adopted(meeting(state, room_id=None), room(RoomState.PENDING), NOW, settings())
    if state == S.CREATING:
        assert change.state == S.READY and change.why.startswith("reconciler adopted room")
    else:
        assert change.room["retired_reason"] == "unwanted"


# --------------------------------------------------------------------------------------------
# Invariants over every rule, state and room shape.

EVENTS = {None, "room.ready", "room.replaced", "room.deleted", "room.failed"}


def every_change() -> list[tuple[str, MeetingState, meetings.Change]]:
    out = []
    rooms = [room(s, due_at=d) for s in RoomState for d in (None, NOW, LATER)]
    facts = [
        meeting(state, room_id=rid, room_end=end, replacing=rep, attempts=att, due_at=due)
        for state in ALL
        for rid, end, rep, att, due in itertools.product(
            (None, ROOM_ID), (PAST, LATER), (False, True), (0, 4), (None, NOW)
        )
    ]
    config = settings()
    for m in facts:
        out.append(("cancelled", m.state, meetings.cancelled(m, None, NOW)))
        out.append(("retried", m.state, meetings.retried(m, NOW)))
        out.append(("creation_due", m.state, meetings.creation_due(m, NOW)))
        out.append(("rescheduled", m.state, meetings.rescheduled(m, None, LATER, NOW)))
        for status in (400, 503):
            out.append(
                ("create_failed", m.state, meetings.create_failed(m, error(status), NOW, config, holds=True))
            )
        for r in rooms:
            out.append(("cancelled", m.state, meetings.cancelled(m, r, NOW)))
            out.append(("rescheduled", m.state, meetings.rescheduled(m, r, LATER, NOW)))
            out.append(("room_made", m.state, meetings.room_made(m, r, NOW, config, holds=True)))
            out.append(("deletion_due", m.state, meetings.deletion_due(m, r, NOW)))
            out.append(("room_deleted", m.state, meetings.room_deleted(m, r, NOW, existed=True)))
            out.append(("room_lost", m.state, meetings.room_lost(m, r, NOW)))
            out.append(("attempt_adopted", m.state, meetings.attempt_adopted(m, r, NOW, config)))
    return out


CHANGES = every_change()


def test_the_table_is_large_and_fast() -> None:
    assert len(CHANGES) > 10_000


def test_invariants_hold_for_every_rule_state_and_room() -> None:
    for rule, state, change in CHANGES:
        where = (rule, state, change)
        assert change.event in EVENTS, where
        if state in TERMINAL and change.state is not None:
            # Only a new booking moves a finished meeting; a failed one also an operator's retry
            # or the caller's cancel.
            assert rule == "rescheduled" or (rule in ("retried", "cancelled") and state == S.FAILED), where
        if change.state == S.READY and state != S.DELETING:
            assert change.meeting.get("room_id") == ROOM_ID, where
            assert change.room.get("due_at") is not None, where
        if change.act:
            assert change.state not in TERMINAL, where
        if rule in ("room_lost", "room_deleted") and "room_id" in change.meeting:
            assert change.meeting["room_id"] is None, where
        if rule == "cancelled" and change.state == S.CANCELLED:
            assert change.retire_replaced == NOW, where
