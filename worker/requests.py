"""Validation of the task arguments callers send (CONTRACT §2): one clear message per broken rule."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_METADATA_BYTES = 4096
M = TypeVar("M", bound="BaseModel")


class InvalidRequest(ValueError):
    """A call broke a rule of the contract; the message names the field and the rule."""


def parse_instant(value: str) -> datetime:
    if "T" not in value.upper() and " " not in value.strip():
        # fromisoformat reads a bare date as midnight; the contract asks for a date-time.
        raise ValueError(f"{value!r} is a date without a time; an ISO-8601 date-time is required")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 date-time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


class RoomOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    room_name_prefix: Annotated[StrictStr, Field(pattern=r"^[a-z0-9-]*$")] | None = None
    room_name_pattern: Literal["uuid", "human-short"] | None = None
    room_mode: Literal["normal", "group"] | None = None
    is_locked: StrictBool | None = None
    fields: list[Literal["hostRoomUrl", "viewerRoomUrl"]] | None = None
    template_type: Literal["viewerMode"] | None = None

    @field_validator("room_name_prefix")
    @classmethod
    def _prefix_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = (info.context or {}).get("caller_prefix_max", 27)
        if value is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, leaving room for the service's own tag")
        return value

    @field_validator("fields")
    @classmethod
    def _unique_fields(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(set(value))


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    queue: Annotated[StrictStr, Field(min_length=1, max_length=200)]


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    booking_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    start: datetime
    end: datetime
    room: RoomOptions = Field(default_factory=RoomOptions)
    notify: Notify | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _iso_string(cls, value: Any, info: ValidationInfo) -> datetime:
        if not isinstance(value, str):
            raise ValueError("must be an ISO-8601 date-time string")
        return parse_instant(value)

    @field_validator("room", mode="before")
    @classmethod
    def _room_object(cls, value: Any) -> Any:
        return RoomOptions() if value is None else value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_object(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        try:
            size = len(json.dumps(value, separators=(",", ":")).encode())
        except (TypeError, ValueError):
            raise ValueError("must be JSON-serialisable") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"is {size} bytes serialised; at most {MAX_METADATA_BYTES} allowed")
        return value

    @model_validator(mode="after")
    def _times(self, info: ValidationInfo) -> ScheduleRequest:
        now: datetime = (info.context or {}).get("now") or datetime.now(UTC)
        if self.end <= self.start:
            raise InvalidRequestField("end", "must be after start")
        if self.end <= now:
            raise InvalidRequestField("end", "must be in the future")
        return self


class BookingRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    booking_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]


class InvalidRequestField(ValueError):
    """Raised inside a model validator to blame one field by name."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")


_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    message = _PREFIX.sub("", error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "is required"
    if not loc:
        return message
    return f"{loc}: {message}"


def validate(model: type[M], args: tuple[Any, ...], kwargs: dict[str, Any], **context: Any) -> M:
    """Build `model` from a task call's arguments or raise InvalidRequest naming every bad field."""
    if args:
        raise InvalidRequest("arguments must be sent as keyword arguments (kwargs), not positionally")
    try:
        return model.model_validate(kwargs, context=context)
    except ValidationError as exc:
        raise InvalidRequest("; ".join(_describe(e) for e in exc.errors())) from None
