"""The overrun rules (CONTRACT §4.3): a meeting's room is never deleted at its end while people are
inside; it goes once it has been empty for the rejoin grace, or at end + the longest overrun.

Pure functions like the rest of `worker/rules/meetings.py` (which calls `held` from its `deletion_due`):
`occupancy_changed` for what Whereby's webhooks say, `session_probed` and `probe_failed` for what
its insights say when there are no webhooks.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from worker.rules import lifecycle
from worker.rules.facts import RELEASE, Change, MeetingFacts, RoomFacts, S
from worker.rules.states import RoomState


def deleting(ending: bool, room: RoomFacts) -> Change:
    """Go on and delete the room (the meeting moves to deleting when the room is its own)."""
    return Change(
        state=S.DELETING if ending else None, why=f"room {room.whereby_id}", act=True, outcome="deleting"
    )


def held(meeting: MeetingFacts, room: RoomFacts, now: datetime, until: datetime, why: str) -> Change:
    """The end has come with people inside: keep the room until `until` (never past the cap)."""
    until = min(until, meeting.overrun_cap)
    first = room.overrun_since is None
    return Change(
        room={"due_at": until, "overrun_since": room.overrun_since or now, **RELEASE},
        event="room.overrunning" if first else None,
        note=f"deletion of room {room.whereby_id} held: {why}",
        note_outcome=f"until {lifecycle.fmt(until)} at the latest",
        outcome=f"held: {why}",
    )


def session_probed(
    meeting: MeetingFacts,
    room: RoomFacts,
    now: datetime,
    *,
    ongoing: bool,
    last_ended: datetime | None,
    poll: timedelta,
    rejoin_grace: timedelta,
) -> Change:
    """Whereby's insights answered (no webhooks): a session still going on holds the deletion and
    is asked about again after `poll`; a room emptied moments ago waits out the rejoin grace."""
    if ongoing:
        return held(meeting, room, now, now + poll, "Whereby reports a session going on")
    if room.overrun_since is not None and last_ended is not None and last_ended + rejoin_grace > now:
        return held(
            meeting, room, now, last_ended + rejoin_grace, "emptied moments ago; waiting for a rejoin"
        )
    return deleting(meeting.room_id == room.id and meeting.state == S.READY, room)


def probe_failed(
    meeting: MeetingFacts, room: RoomFacts, now: datetime, retry_at: datetime, reason: str
) -> Change:
    """Whereby could not say whether a session is going on: never cut a meeting short on a guess;
    ask again at `retry_at` (the cap still bounds the wait)."""
    return Change(
        room={"due_at": min(retry_at, meeting.overrun_cap), **RELEASE},
        note="could not ask Whereby about the room's session",
        note_outcome=reason,
        outcome=f"probe failed: {reason}",
    )


def occupancy_changed(
    meeting: MeetingFacts,
    room: RoomFacts,
    participants: int,
    at: datetime,
    now: datetime,
    *,
    rejoin_grace: timedelta,
) -> Change:
    """A webhook said `participants` people are in the room as of `at` (its createdAt).

    An event older than the newest one applied changes nothing. The first person in sends
    `room.occupied`, the last one out `room.empty`. In a room held past its end, the last one out
    brings the deletion to `at` + rejoin grace, and a rejoin puts it back at the cap."""
    if room.occupancy_at is not None and at < room.occupancy_at:
        return Change(outcome="ignored: older than the newest event applied")
    was = room.participants or 0
    columns: dict[str, Any] = {"participants": participants, "occupancy_at": at}
    if room.participants is None or (was > 0) != (participants > 0):
        columns["occupancy_since"] = at
    current = meeting.room_id == room.id and room.state == RoomState.LIVE
    event = None
    if current and was == 0 and participants > 0:
        event = "room.occupied"
    elif current and was > 0 and participants == 0:
        event = "room.empty"
    if current and meeting.state == S.READY and room.overrun_since is not None:
        due = max(at + rejoin_grace, now) if participants == 0 else meeting.overrun_cap
        columns["due_at"] = min(due, meeting.overrun_cap)
    return Change(room=columns, event=event, outcome=f"{participants} in the room")
