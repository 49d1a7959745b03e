"""Who is in each room: participants joining and leaving, the sessions they make, the events they cause.

Two notions of a session, as Whereby has two:

- The insights session (``GET /v1/insights/room-sessions``) starts at the first join into an empty
  room and ends when the room is empty again; its ``endedAt`` is null while anyone is inside.
- The webhook session: ``room.session.started`` when a second person is inside, and
  ``room.session.ended`` once fewer than two have been inside for ``session_end_delay_seconds``
  (Whereby's "for some time"); one person may still be inside then. It carries the id of the
  insights session it happened in.

Nothing here does I/O: each change returns the events it causes, and the Sandbox hands them to
the webhook sender after it lets go of its lock.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.rooms import Room
from worker.devtools.sandbox.wire import BadRequest, iso_ts

ROLES = ("host", "visitor", "viewer")
SUBDOMAIN = "sandbox"


@dataclass
class Participant:
    participant_id: str
    role: str
    external_id: str | None
    session_id: str
    joined_at: float
    left_at: float | None = None

    def minutes(self, now: float) -> float:
        return ((self.left_at if self.left_at is not None else now) - self.joined_at) / 60

    def view(self) -> dict[str, Any]:
        return {
            "participantId": self.participant_id,
            "roomSessionId": self.session_id,
            "roleName": self.role,
            "externalId": self.external_id,
            "joinedAt": iso_ts(self.joined_at),
            "leftAt": None if self.left_at is None else iso_ts(self.left_at),
        }


@dataclass
class Session:
    session_id: str
    room: Room
    started_at: float
    ended_at: float | None = None
    people: list[Participant] = field(default_factory=list)

    def view(self, now: float) -> dict[str, Any]:
        return {
            "roomSessionId": self.session_id,
            "roomName": self.room.room_name,
            "meetingId": self.room.meeting_id,
            "startedAt": iso_ts(self.started_at),
            "endedAt": None if self.ended_at is None else iso_ts(self.ended_at),
            "totalParticipantMinutes": round(sum(p.minutes(now) for p in self.people), 2),
            "totalUniqueParticipants": len({p.external_id or p.participant_id for p in self.people}),
            "totalRecorderMinutes": 0,
            "totalStreamerMinutes": 0,
        }


@dataclass
class Occupancy:
    """One room's people now, and its webhook session (started, and since when it is below two)."""

    room: Room
    inside: dict[str, Participant] = field(default_factory=dict)
    session: Session | None = None
    webhook_session: str | None = None
    below_since: float | None = None


class Presence:
    """Every room's occupancy and every session ever, for the admin API, insights and webhooks.

    Not locked: the Sandbox that owns it calls it under its own lock. Events are
    ``(room, type, data)`` triples; the webhook sender wraps them in Whereby's envelope.
    """

    def __init__(self, config: SandboxConfig):
        self.config = config
        self._rooms: dict[str, Occupancy] = {}
        self._sessions: dict[str, Session] = {}
        # Newest last, per room name: insights answers newest first.
        self._by_name: dict[str, list[Session]] = {}

    def count(self, meeting_id: str) -> int:
        occupancy = self._rooms.get(meeting_id)
        return 0 if occupancy is None else len(occupancy.inside)

    def participants(self, meeting_id: str) -> list[dict[str, Any]]:
        occupancy = self._rooms.get(meeting_id)
        return [] if occupancy is None else [p.view() for p in occupancy.inside.values()]

    def join(
        self, now: float, room: Room, role: str, external_id: str | None
    ) -> tuple[str, list[tuple[Room, str, dict[str, Any]]]]:
        if role not in ROLES:
            raise BadRequest("role: must be host, visitor or viewer")
        if external_id is not None and (not isinstance(external_id, str) or len(external_id) > 256):
            raise BadRequest("external_id: must be a string of at most 256 characters or null")
        occupancy = self._rooms.setdefault(room.meeting_id, Occupancy(room))
        if occupancy.session is None:
            session = Session(str(uuid.uuid4()), room, now)
            occupancy.session = session
            self._sessions[session.session_id] = session
            self._by_name.setdefault(room.room_name, []).append(session)
        person = Participant(str(uuid.uuid4()), role, external_id, occupancy.session.session_id, now)
        occupancy.session.people.append(person)
        occupancy.inside[person.participant_id] = person
        events = [(room, "room.client.joined", self._client_data(occupancy, person))]
        if len(occupancy.inside) >= 2:
            # Back to two before the end was announced: the same webhook session goes on.
            occupancy.below_since = None
            if occupancy.webhook_session is None:
                occupancy.webhook_session = occupancy.session.session_id
                events.append((room, "room.session.started", self._session_data(occupancy)))
        return person.participant_id, events

    def leave(
        self, now: float, meeting_id: str, participant_id: str
    ) -> list[tuple[Room, str, dict[str, Any]]]:
        occupancy = self._rooms.get(meeting_id)
        person = None if occupancy is None else occupancy.inside.pop(participant_id, None)
        if occupancy is None or person is None:
            raise LookupError("participant_id: not in this room")
        person.left_at = now
        events = [(occupancy.room, "room.client.left", self._client_data(occupancy, person))]
        if not occupancy.inside and occupancy.session is not None:
            occupancy.session.ended_at = now
            occupancy.session = None
        if (
            len(occupancy.inside) < 2
            and occupancy.webhook_session is not None
            and occupancy.below_since is None
        ):
            occupancy.below_since = now
        return events + self.due(now, only=occupancy)

    def due(self, now: float, only: Occupancy | None = None) -> list[tuple[Room, str, dict[str, Any]]]:
        """The room.session.ended events whose delay has run out by ``now``."""
        events: list[tuple[Room, str, dict[str, Any]]] = []
        for occupancy in [only] if only is not None else list(self._rooms.values()):
            if (
                occupancy.below_since is not None
                and now - occupancy.below_since >= self.config.session_end_delay_seconds
            ):
                events.append((occupancy.room, "room.session.ended", self._session_data(occupancy)))
                occupancy.webhook_session = occupancy.below_since = None
            if not occupancy.inside and occupancy.below_since is None:
                # Empty and nothing pending: forget it, so the sender's tick stays cheap.
                self._rooms.pop(occupancy.room.meeting_id, None)
        return events

    def pending(self) -> bool:
        """True while a room.session.ended waits for its delay."""
        return any(occupancy.below_since is not None for occupancy in self._rooms.values())

    def evict(self, now: float, meeting_id: str) -> int:
        """Everyone leaves a deleted room at once, without events (the room is gone); how many were inside."""
        occupancy = self._rooms.pop(meeting_id, None)
        if occupancy is None:
            return 0
        for person in occupancy.inside.values():
            person.left_at = now
        if occupancy.session is not None:
            occupancy.session.ended_at = now
        return len(occupancy.inside)

    def sessions(self, now: float, room_name: str) -> list[dict[str, Any]]:
        return [session.view(now) for session in reversed(self._by_name.get(room_name, []))]

    def session_participants(self, session_id: str) -> list[dict[str, Any]]:
        session = self._sessions.get(session_id)
        return [] if session is None else [p.view() for p in session.people]

    def clear(self) -> None:
        self._rooms.clear()
        self._sessions.clear()
        self._by_name.clear()

    # ---- event data --------------------------------------------------------------------------

    def _session_data(self, occupancy: Occupancy) -> dict[str, Any]:
        return {
            "meetingId": occupancy.room.meeting_id,
            "roomName": occupancy.room.room_name,
            "subdomain": SUBDOMAIN,
            "roomSessionId": occupancy.webhook_session,
            "numClients": len(occupancy.inside),
        }

    def _client_data(self, occupancy: Occupancy, person: Participant) -> dict[str, Any]:
        roles = Counter(p.role for p in occupancy.inside.values())
        by_role = {role: roles[role] for role in ROLES if roles[role] or role == person.role}
        return {
            "meetingId": occupancy.room.meeting_id,
            "roomName": occupancy.room.room_name,
            "subdomain": SUBDOMAIN,
            "numClients": len(occupancy.inside),
            "numClientsByRoleName": by_role,
            "roleName": person.role,
            "roomSessionId": person.session_id,
            "participantId": person.participant_id,
            "externalId": person.external_id,
            "metadata": None,
        }
