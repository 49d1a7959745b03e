"""Every way a meeting and its rooms can move, as pure functions of (current rows, input, now).

Each rule returns a `Change`: the meeting's new state, the columns to set on the meeting and on the
room the input is about, the replaced rooms whose deletion comes forward, the event to send and a
history line. `worker/store/persist.py` applies a Change to the store and decides nothing; the modules
that call Whereby only gather the input. No database, Celery or HTTP here: `tests/pure/test_transitions.py`
runs every state against every input as a table.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from config.settings import Settings
from worker.rules import lifecycle, overrun
from worker.rules.facts import EARLY_SLACK, NOTHING, RELEASE, Change, MeetingFacts, RoomFacts, S
from worker.rules.overrun import occupancy_changed, probe_failed, session_probed
from worker.rules.states import TERMINAL_STATES, RoomState

__all__ = [
    "EARLY_SLACK",
    "NOTHING",
    "RELEASE",
    "Change",
    "MeetingFacts",
    "RoomFacts",
    "occupancy_changed",
    "probe_failed",
    "session_probed",
]

# --------------------------------------------------------------------------------------------
# The caller's inputs.


def booked(create_at: datetime) -> Change:
    """A booking id seen for the first time."""
    return Change(state=S.SCHEDULED, meeting={"due_at": create_at}, outcome="booked")


def rescheduled(
    meeting: MeetingFacts, room: RoomFacts | None, old_room_end: datetime, now: datetime
) -> Change:
    """The same booking id sent again; `meeting` carries the new times (create_at, room_end)."""
    if meeting.state in TERMINAL_STATES:
        # The room of the old booking, if any, is still being deleted; the new booking gets its own.
        return Change(
            state=S.SCHEDULED,
            why="booked again",
            meeting={
                "room_id": None,
                "attempts": 0,
                "last_error": None,
                "replacing": False,
                "due_at": meeting.create_at,
            },
        )
    if room is None:
        # No room yet: creation simply moves. A creation already running checks, when it finishes,
        # whether its room still covers the meeting.
        back = meeting.state == S.CREATING and meeting.create_at > now
        return Change(
            state=S.SCHEDULED if back else None,
            why="rescheduled",
            meeting={"attempts": 0, "due_at": meeting.create_at},
        )
    if lifecycle.covers(room.end_date, meeting.end_date):
        # The room's endDate still covers the new end (and the longest overrun past it): keep the
        # room and its URLs, move the deletion. A held overrun is over: the meeting goes on.
        return Change(
            state=S.READY if meeting.state == S.DELETING else None,
            why="rescheduled before the deletion finished",
            room={"due_at": meeting.room_end, "overrun_since": None},
        )
    # The new end is past the room's endDate: a new room replaces this one. If the new room is due
    # now, the old one lives until it is ready (or its own end); otherwise it goes at once. A room
    # held past its end for the people inside keeps its hold until the replacement is ready.
    old_due = room.due_at or old_room_end
    held = old_due if room.overrun_since is not None else min(old_room_end, old_due)
    return Change(
        state=S.SCHEDULED,
        why="room must be replaced: new end is past its endDate",
        meeting={"room_id": None, "replacing": True, "attempts": 0, "due_at": meeting.create_at},
        room={
            "retired_reason": "replaced",
            "due_at": now if meeting.create_at > now else held,
        },
    )


def cancelled(meeting: MeetingFacts, room: RoomFacts | None, now: datetime) -> Change:
    """The caller cancelled: the room goes now, and no replacement is coming."""
    if meeting.state in (S.CANCELLED, S.ENDED):
        return NOTHING
    # Releasing the claim makes a creation in flight find, when it finishes, that its room is not
    # wanted; it then deletes it.
    return Change(
        state=S.CANCELLED,
        why="cancelled by the caller",
        meeting={"due_at": None, **RELEASE},
        room={"due_at": now, "retired_reason": "cancelled"}
        if room is not None and room.state == RoomState.LIVE
        else {},
        retire_replaced=now,
    )


def retried(meeting: MeetingFacts, now: datetime) -> Change:
    """An operator asks for a failed meeting to be tried afresh."""
    if meeting.state != S.FAILED:
        return NOTHING
    if meeting.room_end <= now:
        return Change(note="not retried: the meeting is over", outcome="over")
    return Change(
        state=S.SCHEDULED,
        why="retried by an operator",
        meeting={"attempts": 0, "last_error": None, "due_at": max(meeting.create_at, now), **RELEASE},
        outcome="retried",
    )


# --------------------------------------------------------------------------------------------
# Creating a room.


def creation_due(meeting: MeetingFacts, now: datetime) -> Change:
    """A creation message arrived and its run holds the meeting: act, skip, or find it over."""
    if meeting.state not in (S.SCHEDULED, S.CREATING) or meeting.due_at is None:
        return Change(meeting=RELEASE, outcome=f"skipped: meeting is {meeting.state}")
    if meeting.due_at > now + EARLY_SLACK:
        # Rescheduled later since it was dispatched: the dispatcher comes back for it.
        return Change(meeting=RELEASE, outcome="skipped: not due yet")
    if meeting.room_end <= now:
        # Over before a room could be made (a long outage): making one now helps nobody.
        if meeting.replacing:
            return Change(
                state=S.ENDED,
                why="ended before its replacement room was made",
                meeting={"due_at": None, "replacing": False, **RELEASE},
                event="room.deleted",
                outcome="skipped: meeting already over (ended)",
            )
        reason = "the meeting ended before a room could be made"
        return Change(
            state=S.FAILED,
            why=reason,
            meeting={"due_at": None, "last_error": reason, **RELEASE},
            event="room.failed",
            outcome="skipped: meeting already over (failed)",
        )
    attempt = meeting.attempts + 1
    return Change(
        state=S.CREATING,
        why=f"attempt {attempt}",
        meeting={"attempts": attempt},
        act=True,
        outcome="creating",
    )


def room_made(
    meeting: MeetingFacts,
    room: RoomFacts,
    now: datetime,
    settings: Settings,
    *,
    holds: bool,
    taken_over: bool = False,
) -> Change:
    """Whereby made (or the reconciler found) the room of an attempt; `room` has its real endDate.

    `holds`: the attempt's run still holds the meeting (the reconciler adopting a room whose
    attempt is provably not in flight acts for that run). `taken_over`: another run holds it now.
    """
    made = room.whereby_id
    if taken_over:
        # Our claim lapsed and another run holds the meeting. It owns this attempt (it looks the room
        # up by its tag and adopts it), so this late finisher changes nothing.
        return Change(
            note=f"late finisher left room {made} alone",
            outcome="claim taken over: the room is left to the run that holds the meeting now",
        )
    if room.state != RoomState.PENDING:
        return Change(meeting=RELEASE, outcome=f"skipped: the attempt's room is already {room.state}")
    live = {"state": RoomState.LIVE, "ready_at": now}
    if not holds or meeting.state != S.CREATING or meeting.room_id is not None:
        # Cancelled, or taken over, while the room was being made: it must not live on.
        return Change(
            room={**live, "due_at": now, "retired_reason": "unwanted"},
            note=f"room {made} not wanted any more",
            note_outcome=str(meeting.state),
            outcome="made a room nobody wants any more; deleting it",
        )
    if not lifecycle.covers(room.end_date, meeting.end_date):
        # Rescheduled to a later end while this room was being made: make another.
        short = {**live, "due_at": now, "retired_reason": "replaced"}
        if meeting.attempts >= settings.max_attempts:
            # Whereby keeps answering an endDate short of the one asked for: stop, loudly.
            reason = (
                f"Whereby's endDate {lifecycle.fmt(room.end_date)} stays short of "
                f"{lifecycle.fmt(meeting.end_date)}"
            )
            return Change(
                state=S.FAILED,
                why=reason,
                meeting={"due_at": None, "last_error": reason, **RELEASE},
                room=short,
                event="room.failed",
                outcome=reason,
            )
        return Change(
            meeting={"due_at": max(meeting.create_at, now), **RELEASE},
            room=short,
            outcome="room too short for the rescheduled meeting; making another",
        )
    event = "room.replaced" if meeting.replacing else "room.ready"
    return Change(
        state=S.READY,
        why=f"room {made}",
        meeting={"room_id": room.id, "due_at": None, "last_error": None, "replacing": False, **RELEASE},
        room={**live, "due_at": meeting.room_end},
        # The room this one replaces has served its purpose now.
        retire_replaced=now if meeting.replacing else None,
        event=event,
        outcome=f"{event}: {made}",
    )


def create_failed(
    meeting: MeetingFacts,
    error: lifecycle.FailedCall,
    now: datetime,
    settings: Settings,
    *,
    holds: bool,
    looked_up: bool = True,
) -> Change:
    """A create failed. Its room is abandoned (whoever holds the meeting) when Whereby surely made
    none: the attempt did not look up an earlier one's room first, and the error proves it."""
    abandoned = {} if looked_up or lifecycle.outcome_unknown(error) else {"state": RoomState.ABANDONED}
    reason = lifecycle.describe(error)
    if not holds:
        return Change(room=abandoned, outcome=f"failed: {reason}")
    if meeting.state != S.CREATING:
        # Rescheduled (or otherwise moved on) during the call: its own due instant stands.
        return Change(meeting=RELEASE, room=abandoned, outcome=f"failed: {reason}")
    attempts = meeting.attempts if lifecycle.counts_as_attempt(error) else meeting.attempts - 1
    decision = lifecycle.after_create_error(
        error, meeting.attempts, now, meeting.room_end, settings, meeting.start
    )
    if isinstance(decision, lifecycle.GiveUp):
        return Change(
            state=S.FAILED,
            why=decision.reason,
            meeting={"attempts": attempts, "due_at": None, "last_error": decision.reason, **RELEASE},
            room=abandoned,
            event="room.failed",
            outcome=f"failed: {decision.reason}",
        )
    return Change(
        meeting={"attempts": attempts, "due_at": decision.at, "last_error": reason, **RELEASE},
        room=abandoned,
        note="retry planned",
        note_outcome=f"at {lifecycle.fmt(decision.at)}: {reason}",
        outcome=f"failed: {reason}",
    )


# --------------------------------------------------------------------------------------------
# Deleting a room.


def deletion_due(meeting: MeetingFacts, room: RoomFacts, now: datetime, *, webhooks: bool = False) -> Change:
    """A deletion message arrived and its run holds the room: the end (or a retirement) is here.

    With an overrun allowed (CONTRACT §4.3), a meeting's own room is not deleted at its end while
    people are inside: with webhooks the stored count says so; without them the caller must first
    ask Whereby whether a session is going on (`probe`), and `session_probed` decides.
    """
    if room.state != RoomState.LIVE or room.due_at is None:
        return Change(room=RELEASE, outcome=f"skipped: room is {room.state}")
    if room.due_at > now + EARLY_SLACK:
        return Change(room=RELEASE, outcome="skipped: not due yet")
    ending = meeting.room_id == room.id and meeting.state == S.READY
    if ending and meeting.overrun and now + EARLY_SLACK < meeting.overrun_cap:
        if not webhooks:
            return Change(act=True, probe=True, outcome="asking Whereby whether a session is going on")
        if room.participants:
            return overrun.held(meeting, room, now, meeting.overrun_cap, f"{room.participants} in the room")
    return overrun.deleting(ending, room)


def room_deleted(meeting: MeetingFacts, room: RoomFacts, now: datetime, *, existed: bool) -> Change:
    """Whereby confirmed the room is gone (204, or 404: already gone)."""
    gone = "deleted" if existed else "already gone"
    # The room is gone whoever holds its claim now: record that, it is a fact.
    room_change = {
        "state": RoomState.DELETED,
        "deleted_at": now,
        "due_at": None,
        "last_error": None,
        **RELEASE,
    }
    common: dict[str, Any] = {
        "room": room_change,
        "note": f"room {room.whereby_id} {gone}",
        "note_outcome": room.retired_reason or "end",
        "outcome": gone,
    }
    if meeting.room_id != room.id:
        return Change(**common)
    # Rescheduled to a later end while this deletion was already on its way to Whereby.
    extended = room.due_at is not None and room.due_at > now + EARLY_SLACK
    if extended and meeting.state == S.READY:
        # The meeting goes on: it gets a new room at once (sent as room.replaced).
        return Change(
            state=S.CREATING,
            why="room deleted just before a reschedule",
            meeting={"room_id": None, "replacing": True, "attempts": 0, "due_at": now},
            **common,
        )
    ends = meeting.state in (S.READY, S.DELETING)
    return Change(
        state=S.ENDED if ends else None,
        why=f"room {room.whereby_id} {gone}",
        meeting={"room_id": None},
        event="room.deleted",
        **common,
    )


def delete_failed(
    meeting: MeetingFacts,
    room: RoomFacts,
    attempts: int,
    error: lifecycle.FailedCall,
    now: datetime,
    settings: Settings,
    *,
    holds: bool,
) -> Change:
    """A deletion failed. Deletions never give up: a room must not outlive its use."""
    reason = lifecycle.describe(error)
    if not holds:
        return Change(outcome=f"failed: {reason}")
    at = lifecycle.after_delete_error(error, attempts + 1, now, settings)
    return Change(
        meeting={"last_error": reason} if meeting.room_id == room.id else {},
        room={"attempts": attempts + 1, "last_error": reason, "due_at": at, **RELEASE},
        note="deletion retry planned",
        note_outcome=f"at {lifecycle.fmt(at)}: {reason}",
        outcome=f"failed: {reason}",
    )


# --------------------------------------------------------------------------------------------
# What the reconciler finds.


def room_lost(meeting: MeetingFacts, room: RoomFacts, now: datetime) -> Change:
    """A room the store holds live is no longer on Whereby (deleted out of band, or expired)."""
    common: dict[str, Any] = {
        "room": {"state": RoomState.DELETED, "deleted_at": now, "due_at": None, **RELEASE},
        "note": f"room {room.whereby_id} is gone from Whereby",
        "note_outcome": "found by the reconciler",
        "outcome": "lost",
    }
    if meeting.room_id != room.id:
        return Change(**common)
    if meeting.state in (S.READY, S.DELETING) and meeting.room_end > now:
        return Change(
            state=S.CREATING,
            why="room vanished before the end: replacing it",
            meeting={"room_id": None, "replacing": True, "attempts": 0, "due_at": now},
            **common,
        )
    if meeting.state in (S.READY, S.DELETING):
        return Change(
            state=S.ENDED,
            why="room vanished after the end",
            meeting={"room_id": None},
            event="room.deleted",
            **common,
        )
    return Change(
        meeting={"room_id": None},
        event="room.deleted" if meeting.state == S.CANCELLED else None,
        **common,
    )


def attempt_adopted(meeting: MeetingFacts, room: RoomFacts, now: datetime, settings: Settings) -> Change:
    """The reconciler found the room of an attempt whose reply was lost and which no run holds."""
    change = room_made(meeting, room, now, settings, holds=True)
    if change.state == S.READY:
        return replace(change, why=f"reconciler adopted room {room.whereby_id}")
    return change
