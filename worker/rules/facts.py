"""What the lifecycle rules (`rules/meetings.py`, `rules/overrun.py`) read and return: the facts of a
meeting and of a room, and the Change a rule decides. Plain data, no behaviour but derived values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from worker.rules.states import MeetingState, RoomState

S = MeetingState

# A task that runs this much before its due instant (clock skew between hosts) still acts.
EARLY_SLACK = timedelta(seconds=2)
RELEASE: Mapping[str, Any] = {"claim_token": None, "claim_until": None}


@dataclass(frozen=True)
class MeetingFacts:
    """What the rules read of a meeting row (after a reschedule: its new times already)."""

    state: MeetingState
    create_at: datetime
    room_end: datetime
    due_at: datetime | None = None
    attempts: int = 0
    replacing: bool = False
    room_id: int | None = None  # the current room
    # How long past room_end a room with people inside may be kept (ROOMKEEPER_OVERRUN_MAX_SECONDS).
    overrun: timedelta = timedelta(0)
    start: datetime | None = None  # the meeting's start: retries of its creation never wait past it

    @property
    def end_date(self) -> datetime:
        """The Whereby endDate a room of this meeting needs: room_end plus the longest overrun."""
        return self.room_end + self.overrun

    @property
    def overrun_cap(self) -> datetime:
        """The latest instant a room of this meeting may live, whoever is inside."""
        return self.room_end + self.overrun


@dataclass(frozen=True)
class RoomFacts:
    """What the rules read of one Whereby room row."""

    id: int
    state: RoomState
    end_date: datetime
    due_at: datetime | None = None
    retired_reason: str | None = None
    whereby_id: str | None = None
    participants: int | None = None  # from Whereby's webhooks; None: no event told
    occupancy_at: datetime | None = None  # createdAt of the newest event applied
    overrun_since: datetime | None = None  # the end came with people inside


@dataclass(frozen=True)
class Change:
    state: MeetingState | None = None  # the meeting's new state; None leaves it
    why: str = ""  # the reason written beside a state change
    meeting: Mapping[str, Any] = field(default_factory=dict)  # meeting columns to set
    room: Mapping[str, Any] = field(default_factory=dict)  # columns of the room the input is about
    # Rooms retired as "replaced" are deleted no later than this (their replacement is ready, or
    # no replacement is coming).
    retire_replaced: datetime | None = None
    event: str | None = None  # sent to the caller's notify once the change has committed
    note: str | None = None  # a history line besides the state change
    note_outcome: str = ""
    act: bool = False  # the caller may go on and call Whereby
    probe: bool = False  # ask Whereby whether a session is going on before acting (`session_probed`)
    outcome: str = ""  # what the task reports

    @property
    def changes_meeting(self) -> bool:
        return self.state is not None or any(name not in RELEASE for name in self.meeting)


NOTHING = Change()
