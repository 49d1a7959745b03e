"""The states a meeting and a room move through: plain names the rules decide on and the store keeps."""

from __future__ import annotations

import enum


class MeetingState(enum.StrEnum):
    SCHEDULED = "scheduled"
    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"
    ENDED = "ended"
    CANCELLED = "cancelled"
    FAILED = "failed"


TERMINAL_STATES = frozenset({MeetingState.ENDED, MeetingState.CANCELLED, MeetingState.FAILED})


class RoomState(enum.StrEnum):
    PENDING = "pending"  # a create was (or is about to be) sent; its outcome is not known yet
    LIVE = "live"
    DELETED = "deleted"
    ABANDONED = "abandoned"  # known never to have been made on Whereby
