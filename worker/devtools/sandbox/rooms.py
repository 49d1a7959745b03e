"""The in-memory rooms and the /v1/meetings endpoints over them: create, get, list, delete, expiry."""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.wire import BadRequest, Reply, error, iso, iso_ts

# Whereby and the caller never share a clock; a create racing its own endDate must not fail.
CLOCK_SLACK_SECONDS = 1.0
EXTRA_FIELDS = ("hostRoomUrl", "viewerRoomUrl")
HUMAN_SHORT_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PREFIX_RE = re.compile(r"[a-z0-9-]{0,39}")


def parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    # Whereby reads an endDate without an offset as UTC, not as its own local time.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def encode_cursor(meeting_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{meeting_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("cursor: invalid") from None
    kind, _, number = text.partition(":")
    if kind != "after" or not number.isdigit():
        raise BadRequest("cursor: invalid")
    return int(number)


def query_fields(query: list[tuple[str, str]]) -> list[str]:
    wanted = [item.strip() for key, value in query if key == "fields" for item in value.split(",")]
    wanted = [item for item in wanted if item]
    if any(item not in EXTRA_FIELDS for item in wanted):
        raise BadRequest("fields: must be a comma-separated list of hostRoomUrl, viewerRoomUrl")
    return wanted


@dataclass
class Room:
    meeting_id: str
    room_name: str
    room_url: str
    created_at: float
    end: datetime
    room_mode: str
    is_locked: bool
    host_key: str
    viewer_key: str
    deleted_at: float | None = None
    deleted_by: str | None = None
    # How many people were inside when it was deleted (by the API, out of band or by expiry).
    deleted_with_participants: int | None = None

    @property
    def live(self) -> bool:
        return self.deleted_at is None

    def meeting(self, extra: Iterable[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "meetingId": self.meeting_id,
            "roomName": self.room_name,
            "roomUrl": self.room_url,
            "startDate": iso_ts(self.created_at),
            "endDate": iso(self.end),
        }
        wanted = set(extra)
        if "hostRoomUrl" in wanted:
            body["hostRoomUrl"] = f"{self.room_url}?roomKey={self.host_key}"
        if "viewerRoomUrl" in wanted:
            body["viewerRoomUrl"] = f"{self.room_url}?roomKey={self.viewer_key}"
        return body

    def record(self) -> dict[str, Any]:
        return {
            "meeting_id": self.meeting_id,
            "room_name": self.room_name,
            "room_url": self.room_url,
            "end_date": iso(self.end),
            "created_at": iso_ts(self.created_at),
            "deleted_at": None if self.deleted_at is None else iso_ts(self.deleted_at),
            "deleted_by": self.deleted_by,
            "deleted_with_participants": self.deleted_with_participants,
            "live": self.live,
            "room_mode": self.room_mode,
            "is_locked": self.is_locked,
        }


class Rooms:
    """Every room the sandbox ever made, live or deleted, and the endpoints that read and change them.

    Not locked: the Sandbox that owns it calls it under its own lock.
    """

    def __init__(self, config: SandboxConfig):
        self.config = config
        # Ids keep counting across clear() so a client holding a stale id never finds another room.
        self._next_id = 1
        self._rooms: dict[str, Room] = {}
        self._names: set[str] = set()
        # Insertion order is meetingId order, which is the order the list endpoint pages in.
        self._live: dict[str, Room] = {}
        # Expiry order is endDate order whatever expiry_seconds is, so one heap serves every setting.
        self._by_end: list[tuple[float, int, str]] = []
        # Told of every deletion, whatever its cause; the Sandbox empties the room with it.
        self.on_delete: Callable[[Room], None] | None = None

    def known(self, meeting_id: str) -> Room | None:
        """The room with this id, live or deleted."""
        return self._rooms.get(meeting_id)

    # ---- the /v1/meetings endpoints -----------------------------------------------------------

    def create(self, now: float, raw: bytes) -> tuple[Room, Reply]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("body: must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest("body: must be a JSON object")

        if body.get("endDate") is None:
            raise BadRequest("endDate: required")
        end = parse_instant(body["endDate"])
        if end is None:
            raise BadRequest("endDate: must be an ISO-8601 date-time")
        if end.timestamp() < now - CLOCK_SLACK_SECONDS:
            raise BadRequest("endDate: must not be in the past")

        prefix = body.get("roomNamePrefix", "")
        if not isinstance(prefix, str):
            raise BadRequest("roomNamePrefix: must be a string")
        prefix = "".join(prefix.lower().split())
        if not PREFIX_RE.fullmatch(prefix):
            raise BadRequest("roomNamePrefix: must match ^[a-z0-9-]{0,39}$")

        pattern = body.get("roomNamePattern", "uuid")
        if pattern not in ("uuid", "human-short"):
            raise BadRequest("roomNamePattern: must be uuid or human-short")
        mode = body.get("roomMode", "normal")
        if mode not in ("normal", "group"):
            raise BadRequest("roomMode: must be normal or group")
        locked = body.get("isLocked", False)
        if not isinstance(locked, bool):
            raise BadRequest("isLocked: must be a boolean")
        extra = body.get("fields", [])
        if not isinstance(extra, list) or any(item not in EXTRA_FIELDS for item in extra):
            raise BadRequest("fields: must be a list of hostRoomUrl, viewerRoomUrl")
        template = body.get("templateType")
        if template is not None and template != "viewerMode":
            raise BadRequest("templateType: must be viewerMode")
        if template == "viewerMode":
            mode, locked, extra = "group", True, list(EXTRA_FIELDS)

        meeting_id = str(self._next_id)
        self._next_id += 1
        name = self._new_name(prefix, pattern)
        room = Room(
            meeting_id=meeting_id,
            room_name=name,
            room_url=self.config.public_url.rstrip("/") + name,
            created_at=now,
            end=end.astimezone(UTC),
            room_mode=mode,
            is_locked=locked,
            host_key=secrets.token_urlsafe(24),
            viewer_key=secrets.token_urlsafe(24),
        )
        self._rooms[meeting_id] = room
        self._live[meeting_id] = room
        heapq.heappush(self._by_end, (end.timestamp(), int(meeting_id), meeting_id))
        return room, Reply(201, room.meeting(extra))

    def _new_name(self, prefix: str, pattern: str) -> str:
        while True:
            if pattern == "uuid":
                tail = str(uuid.uuid4())
            else:
                tail = "".join(secrets.choice(HUMAN_SHORT_ALPHABET) for _ in range(6))
            name = f"/{prefix}{tail}"
            # Whereby's room names are unique forever; six characters can collide, so retry.
            if name not in self._names:
                self._names.add(name)
                return name

    def get(self, meeting_id: str, query: list[tuple[str, str]]) -> Reply:
        extra = query_fields(query)
        room = self._live.get(meeting_id)
        if room is None:
            return error(404, "Not Found")
        return Reply(200, room.meeting(extra))

    def list_page(self, query: list[tuple[str, str]]) -> Reply:
        params = dict(query)
        extra = query_fields(query)
        raw_limit = params.get("limit", "50")
        if not raw_limit.strip().isdigit() or not 1 <= int(raw_limit) <= 100:
            raise BadRequest("limit: must be an integer from 1 to 100")
        limit = int(raw_limit)
        after = decode_cursor(params["cursor"]) if params.get("cursor") else 0
        starts = params.get("roomName[startsWith]", "")

        page: list[Room] = []
        more = False
        for room in self._live.values():
            if int(room.meeting_id) <= after or not room.room_name.startswith(starts):
                continue
            if len(page) == limit:
                more = True
                break
            page.append(room)
        cursor = encode_cursor(int(page[-1].meeting_id)) if more else None
        return Reply(200, {"results": [room.meeting(extra) for room in page], "cursor": cursor})

    def delete(self, now: float, meeting_id: str) -> Reply:
        room = self._rooms.get(meeting_id)
        if room is None:
            status = self.config.delete_unknown_status
            return Reply(204) if status == 204 else error(status, "Not Found")
        if room.live:
            self._mark_deleted(room, now, "api")
        return Reply(204)

    # ---- lifecycle ---------------------------------------------------------------------------

    def _mark_deleted(self, room: Room, at: float, by: str) -> None:
        room.deleted_at = at
        room.deleted_by = by
        self._live.pop(room.meeting_id, None)
        if self.on_delete is not None:
            self.on_delete(room)

    def expire(self, now: float) -> None:
        grace = self.config.expiry_seconds
        while self._by_end and self._by_end[0][0] + grace <= now:
            end_ts, _, meeting_id = heapq.heappop(self._by_end)
            room = self._live.get(meeting_id)
            if room is not None:
                # Stamp the moment Whereby would have deleted it, not the moment we noticed.
                self._mark_deleted(room, end_ts + grace, "expiry")

    def delete_out_of_band(self, now: float, meeting_id: str) -> bool:
        """Deletes a room behind the client's back; False when the id was never seen."""
        room = self._rooms.get(meeting_id)
        if room is None:
            return False
        if room.live:
            self._mark_deleted(room, now, "out_of_band")
        return True

    def records(self, include_deleted: bool) -> list[dict[str, Any]]:
        return [room.record() for room in self._rooms.values() if include_deleted or room.live]

    def clear(self) -> None:
        """Forgets every room but keeps counting ids."""
        self._rooms.clear()
        self._live.clear()
        self._names.clear()
        self._by_end.clear()
