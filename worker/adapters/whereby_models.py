"""Whereby's payloads as typed models: what the client sends and what it returns (WHEREBY.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator
from pydantic.alias_generators import to_camel


def _as_utc(value: datetime) -> datetime:
    # Whereby reads a time without an offset as UTC, so a naive value means the same here.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class _WherebyModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="ignore")


class CreateMeetingRequest(_WherebyModel):
    end_date: datetime
    room_name_prefix: str | None = None
    room_name_pattern: Literal["uuid", "human-short"] | None = None
    room_mode: Literal["normal", "group"] | None = None
    is_locked: bool | None = None
    fields: list[Literal["hostRoomUrl", "viewerRoomUrl"]] | None = None
    template_type: Literal["viewerMode"] | None = None

    @field_serializer("end_date")
    def _serialize_end_date(self, value: datetime) -> str:
        return _as_utc(value).replace(tzinfo=None).isoformat() + "Z"

    def to_body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Meeting(_WherebyModel):
    meeting_id: str
    room_name: str | None = None
    room_url: str
    start_date: datetime | None = None
    end_date: datetime
    host_room_url: str | None = None
    viewer_room_url: str | None = None

    @field_validator("meeting_id", mode="before")
    @classmethod
    def _meeting_id_as_str(cls, value: object) -> object:
        # The id is documented as a string but is digits in practice; some replies send a number.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("start_date", "end_date")
    @classmethod
    def _dates_as_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _as_utc(value)


class _MeetingPage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    results: list[Meeting]
    cursor: str | None = None


_ModelT = TypeVar("_ModelT", bound=BaseModel)


class RoomSession(_WherebyModel):
    """One session of a room from the insights API; `ended_at` is None while it goes on."""

    room_session_id: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @field_validator("started_at", "ended_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _as_utc(value)


class _SessionPage(BaseModel):
    results: list[RoomSession]
    cursor: str | None = None


@dataclass(frozen=True)
class CallRecord:
    """One HTTP attempt, for the caller's audit log."""

    method: str
    path: str
    status: int | None
    error: str | None
    elapsed: float
    meeting_id: str | None
