"""The overrun rules of CONTRACT §4.3 as pure functions: no database, Celery or HTTP.

A meeting's room is never deleted at its end while people are inside; it goes once it has been
empty for the rejoin grace, or at end + the longest overrun, whichever comes first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.rules import meetings
from worker.store.models import MeetingState, RoomState

S = MeetingState
END = datetime(2096, 3, 1, 12, 0, tzinfo=UTC)
OVERRUN = timedelta(minutes=30)
CAP = END + OVERRUN
GRACE = timedelta(minutes=2)
ROOM_ID = 7


def meeting(state: MeetingState = S.READY, **fields: Any) -> meetings.MeetingFacts:
    values: dict[str, Any] = {
        "create_at": END - timedelta(hours=1),
        "room_end": END,
        "room_id": ROOM_ID,
        "overrun": OVERRUN,
    }
    values.update(fields)
    return meetings.MeetingFacts(state=state, **values)


def room(**fields: Any) -> meetings.RoomFacts:
    values: dict[str, Any] = {"id": ROOM_ID, "end_date": CAP, "due_at": END, "whereby_id": "4242"}
    values.update(fields)
    return meetings.RoomFacts(state=fields.pop("state", RoomState.LIVE), **values)


# -- at the end -------------------------------------------------------------------------------


def test_an_empty_room_is_deleted_at_its_end() -> None:
    for participants in (None, 0):
        change = meetings.deletion_due(meeting(), room(participants=participants), END, webhooks=True)
        assert change.act and change.state == S.DELETING and change.event is None


def test_an_occupied_room_is_held_until_the_cap_and_says_overrunning() -> None:
    change = meetings.deletion_due(meeting(), room(participants=2), END, webhooks=True)
    assert not change.act and change.state is None
    assert change.room["due_at"] == CAP and change.room["overrun_since"] == END
    assert change.event == "room.overrunning"
    assert change.room["claim_token"] is None  # the claim is let go: the next due instant re-claims


def test_overrunning_is_sent_once() -> None:
    held = room(participants=1, overrun_since=END, due_at=END + timedelta(minutes=5))
    change = meetings.deletion_due(meeting(), held, END + timedelta(minutes=5), webhooks=True)
    assert not change.act and change.event is None and change.room["overrun_since"] == END


def test_the_cap_deletes_whoever_is_inside() -> None:
    held = room(participants=3, overrun_since=END, due_at=CAP)
    change = meetings.deletion_due(meeting(), held, CAP, webhooks=True)
    assert change.act and change.state == S.DELETING


def test_without_an_overrun_allowed_the_end_deletes_whoever_is_inside() -> None:
    change = meetings.deletion_due(meeting(overrun=timedelta(0)), room(participants=2), END, webhooks=True)
    assert change.act


@pytest.mark.parametrize("reason", ["cancelled", "replaced", "unwanted"])
def test_a_retired_room_goes_at_once_even_with_people_inside(reason: str) -> None:
    state = S.CANCELLED if reason == "cancelled" else S.READY
    retired = room(participants=2, retired_reason=reason, due_at=END - timedelta(minutes=20))
    other = meeting(state, room_id=None if reason == "cancelled" else 99)
    change = meetings.deletion_due(other, retired, END - timedelta(minutes=20), webhooks=True)
    assert change.act


def test_without_webhooks_the_end_asks_whereby_first() -> None:
    change = meetings.deletion_due(meeting(), room(), END, webhooks=False)
    assert change.act and change.probe and change.state is None


# -- who is in the room ------------------------------------------------------------------------


def occupied(
    count: int, at: datetime, current: meetings.RoomFacts, m: meetings.MeetingFacts | None = None
) -> meetings.Change:
    return meetings.occupancy_changed(m or meeting(), current, count, at, at, rejoin_grace=GRACE)


def test_first_in_and_last_out_send_occupied_and_empty() -> None:
    t = END - timedelta(minutes=30)
    first = occupied(1, t, room())
    assert first.event == "room.occupied" and first.room["participants"] == 1
    assert first.room["occupancy_since"] == t
    second = occupied(2, t + timedelta(seconds=5), room(participants=1, occupancy_at=t))
    assert second.event is None and "occupancy_since" not in second.room
    last = occupied(0, t + timedelta(minutes=1), room(participants=2, occupancy_at=t))
    assert last.event == "room.empty" and last.room["occupancy_since"] == t + timedelta(minutes=1)
    assert "due_at" not in last.room  # before the end, leaving changes no deletion


def test_an_older_event_never_overrides_a_newer_one() -> None:
    t = END - timedelta(minutes=10)
    change = occupied(3, t - timedelta(seconds=1), room(participants=0, occupancy_at=t))
    assert change.room == {} and change.event is None


def test_the_last_one_out_of_an_overrunning_room_brings_the_deletion_to_the_rejoin_grace() -> None:
    left = END + timedelta(minutes=7)
    held = room(participants=1, overrun_since=END, due_at=CAP, occupancy_at=END)
    change = occupied(0, left, held)
    assert change.room["due_at"] == left + GRACE and change.event == "room.empty"


def test_a_rejoin_puts_the_deletion_back_at_the_cap() -> None:
    back = END + timedelta(minutes=8)
    emptied = room(
        participants=0, overrun_since=END, due_at=back + GRACE, occupancy_at=back - timedelta(seconds=30)
    )
    change = occupied(1, back, emptied)
    assert change.room["due_at"] == CAP and change.event == "room.occupied"


def test_the_rejoin_grace_never_passes_the_cap() -> None:
    left = CAP - timedelta(seconds=30)
    change = occupied(0, left, room(participants=1, overrun_since=END, due_at=CAP, occupancy_at=END))
    assert change.room["due_at"] == CAP


def test_a_deletion_under_way_is_not_moved_by_a_late_join() -> None:
    held = room(participants=0, overrun_since=END, due_at=END + timedelta(minutes=3))
    change = occupied(1, END + timedelta(minutes=3), held, meeting(S.DELETING))
    assert "due_at" not in change.room


def test_a_replaced_room_counts_but_sends_no_event() -> None:
    change = occupied(1, END - timedelta(minutes=5), room(), meeting(room_id=99))
    assert change.room["participants"] == 1 and change.event is None


# -- without webhooks: Whereby's insights --------------------------------------------------------


def probed(
    ongoing: bool, last_ended: datetime | None, now: datetime, current: meetings.RoomFacts
) -> meetings.Change:
    return meetings.session_probed(
        meeting(),
        current,
        now,
        ongoing=ongoing,
        last_ended=last_ended,
        poll=timedelta(minutes=1),
        rejoin_grace=GRACE,
    )


def test_a_session_going_on_holds_and_asks_again_after_the_poll_interval() -> None:
    change = probed(True, None, END, room())
    assert not change.act and change.room["due_at"] == END + timedelta(minutes=1)
    assert change.event == "room.overrunning"


def test_the_poll_never_passes_the_cap() -> None:
    now = CAP - timedelta(seconds=10)
    change = probed(True, None, now, room(overrun_since=END))
    assert change.room["due_at"] == CAP


def test_no_session_deletes() -> None:
    assert probed(False, None, END, room()).act
    assert probed(False, END - timedelta(minutes=5), END, room()).act  # emptied before the end


def test_a_session_that_just_ended_in_an_overrun_waits_for_a_rejoin() -> None:
    ended = END + timedelta(minutes=5)
    change = probed(False, ended, ended + timedelta(seconds=30), room(overrun_since=END))
    assert not change.act and change.room["due_at"] == ended + GRACE
    assert probed(False, ended, ended + GRACE, room(overrun_since=END)).act


def test_a_failed_probe_never_deletes_and_retries_within_the_cap() -> None:
    change = meetings.probe_failed(meeting(), room(), END, END + timedelta(hours=2), "ServerError")
    assert not change.act and change.room["due_at"] == CAP


# -- rescheduling --------------------------------------------------------------------------------


def test_a_reschedule_within_the_endDate_keeps_the_room_and_ends_the_overrun() -> None:
    new_end = END + timedelta(minutes=20)
    moved = meeting(room_end=new_end)
    # Covered: the room's endDate (made for a longer booking) is past the new end + the overrun.
    held = room(participants=2, overrun_since=END, due_at=CAP, end_date=END + timedelta(hours=2))
    change = meetings.rescheduled(moved, held, END, END + timedelta(minutes=5))
    assert change.room == {"due_at": new_end, "overrun_since": None}


def test_a_reschedule_past_the_endDate_keeps_the_held_room_until_its_replacement() -> None:
    now = END + timedelta(minutes=5)
    moved = meeting(room_end=END + timedelta(hours=2), create_at=now - timedelta(minutes=1))
    held = room(participants=2, overrun_since=END, due_at=CAP)
    change = meetings.rescheduled(moved, held, END, now)
    assert change.room["retired_reason"] == "replaced" and change.room["due_at"] == CAP
    assert change.state == S.SCHEDULED


def test_the_room_asked_for_covers_the_longest_overrun() -> None:
    assert meeting().end_date == CAP
    # A room whose endDate stops at the end does not serve a meeting that may overrun: replaced.
    short = room(end_date=END)
    change = meetings.rescheduled(
        meeting(room_end=END + timedelta(minutes=1)), short, END, END - timedelta(hours=2)
    )
    assert change.room["retired_reason"] == "replaced"
