"""Validation of the task arguments callers send (CONTRACT §2): one clear message per broken rule.

Pure like every rule: what a check needs of the world comes in through the validation context
(`parse(model, data, **context)`, `validate(...)`, `model_validate(data, context=...)`), which the
faces fill: `settings` (the running Settings; needed by a notify URL and by an HTTP caller's notify
task), `now` (the moment `end` must come after; without it that rule is not applied),
`caller_prefix_max`, `over_http`, and `check_url` (the faces pass `worker.adapters.outbound.check_url`,
which also resolves the URL's host and refuses a private address; without it, worker.rules.outbound
judges the URL from its text and the settings, and the host is checked again when an event is sent).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from config.settings import Settings
from worker.rules.outbound import OutboundRefused, check_url

MAX_METADATA_BYTES = 4096
MAX_URL_LENGTH = 2000
M = TypeVar("M", bound="BaseModel")


# One broken rule: (field, rule). The field is dotted (`room.room_mode`, `metadata.notes.0`), or ""
# for a rule about the call as a whole ("arguments must be sent as keyword arguments ...").
FieldRule = tuple[str, str]


def describe(problems: Sequence[FieldRule]) -> str:
    """The text callers read (CONTRACT §2.6): `field: rule; field: rule`."""
    return "; ".join(f"{field}: {rule}" if field else rule for field, rule in problems)


class InvalidRequest(ValueError):
    """A call broke rules of the contract: `problems` names each (field, rule).

    Its message (`args`) is only `describe(problems)`, so that Celery hands callers that text, and
    rebuilds the error on their side from it alone (`InvalidRequest(message)`, no `problems`).
    """

    problems: tuple[FieldRule, ...]

    def __init__(self, problems: Sequence[FieldRule] | str) -> None:
        if isinstance(problems, str):  # rebuilt from its message: the pairs did not travel
            super().__init__(problems)
            self.problems = ()
        else:
            super().__init__(describe(problems))
            self.problems = tuple(problems)


# Characters the store cannot keep as text, on either database: PostgreSQL's text types refuse NUL
# (psycopg raises DataError) and SQLite keeps it but its SQL functions stop there; a lone UTF-16
# surrogate has no UTF-8 encoding, so neither psycopg nor sqlite3 can even send it.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """The rule `text` breaks when it holds a character the store cannot keep, else None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain the NUL character (U+0000)"
    return f"must not contain a lone surrogate (U+{ord(found.group()):04X}): not valid Unicode text"


def _unstorable_in(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Every place inside a JSON value (keys and strings, nested) that the store cannot keep."""
    found: list[tuple[tuple[str, ...], str]] = []
    if isinstance(value, str):
        if rule := unstorable(value):
            found.append((path, rule))
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (rule := unstorable(key)):
                found.append((path, f"key {key!r} {rule}"))
                continue  # its value is reported under a name no one could send back
            found.extend(_unstorable_in(item, (*path, str(key))))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.extend(_unstorable_in(item, (*path, str(index))))
    return found


def _refuse_unstorable(value: Any) -> None:
    """Raise one error that lists every unstorable place in `value` (its path rides in ctx)."""
    found = _unstorable_in(value)
    if found:
        raise PydanticCustomError(
            "unstorable_text", "{rule}", {"rule": found[0][1], "problems": [(list(p), r) for p, r in found]}
        )


class _Request(BaseModel):
    """What every request model shares: no field, however typed, takes text the store cannot keep."""

    @field_validator("*", mode="before")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # Strings only: nested objects are checked by their own model, metadata walks its whole
        # value itself, and a wrong type is left to the field's own rule.
        if isinstance(value, str):
            _refuse_unstorable(value)
        return value


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


class RoomOptions(_Request):
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


class Notify(_Request):
    """Where this booking's events go: a Celery task (`{"task", "queue"}`), or a URL (`{"url"}`)
    that receives each event as a signed POST."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="The Celery task sent for each event (with `queue`)."
    )
    queue: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="The queue that task is sent to."
    )
    url: Annotated[StrictStr, Field(min_length=1, max_length=MAX_URL_LENGTH)] | None = Field(
        default=None,
        description=(
            "Instead of a task: each event is POSTed here as JSON, signed (`Roomkeeper-Signature`), "
            "retried with backoff (24 hours by default). `https` to a public host, or a host listed in "
            "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS; needs ROOMKEEPER_NOTIFY_SIGNING_SECRET on the service."
        ),
    )

    @field_validator("url")
    @classmethod
    def _url_allowed(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        settings = _settings(info)
        if settings.notify_signing_secret is None:
            raise ValueError(
                "events to a URL are signed, and this service has no ROOMKEEPER_NOTIFY_SIGNING_SECRET "
                "set; use a notify task or ask its operator to set one"
            )
        try:
            ((info.context or {}).get("check_url") or check_url)(value, settings)
        except OutboundRefused as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_target(self, info: ValidationInfo) -> Notify:
        if self.url is not None:
            if self.task is not None or self.queue is not None:
                raise ValueError('give either {"url"} or {"task", "queue"}, not both')
            return self
        if self.task is None and self.queue is None:
            raise ValueError('must be {"task": NAME, "queue": QUEUE} or {"url": "https://..."}')
        for name in ("task", "queue"):
            if getattr(self, name) is None:
                raise _field_error(name, "is required")
        context = info.context or {}
        if context.get("over_http"):
            # An HTTP caller must not make the service send Celery messages of its choosing to a
            # queue of its choosing (CONTRACT §6.2): only the tasks the operator lists.
            settings = _settings(info)
            assert self.task is not None and self.queue is not None
            if not settings.http_notify_allowed(self.task, self.queue):
                raise _field_error(
                    "task",
                    "a notify task is not accepted over HTTP: give a notify URL, or ask the "
                    "operator to list the task in ROOMKEEPER_HTTP_NOTIFY_TASKS",
                )
        return self

    @model_serializer(mode="wrap")
    def _given_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored as the caller gave it: a task notify keeps exactly its {"task", "queue"}.
        return {key: value for key, value in handler(self).items() if value is not None}


class ScheduleRequest(_Request):
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
        _refuse_unstorable(value)  # this validator runs before the shared one: say the same
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
        # Storable, but refused for consistency: the column (SQLAlchemy JSON: `json` on PostgreSQL,
        # text on SQLite) holds json.dumps's output, where NUL and lone surrogates are the escapes
        # "\u0000" and "\ud800", so such metadata is stored and read back on both databases.
        # It is refused anyway, like every other field: PostgreSQL's own JSON operators (->>) and a
        # cast to jsonb fail on those escapes ("unsupported Unicode escape sequence", "invalid input
        # syntax for type json"), so the value could never be queried or moved to jsonb.
        _refuse_unstorable(value)
        try:
            size = len(json.dumps(value, separators=(",", ":")).encode())
        except (TypeError, ValueError):
            raise ValueError("must be JSON-serialisable") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"is {size} bytes serialised; at most {MAX_METADATA_BYTES} allowed")
        return value

    @model_validator(mode="after")
    def _times(self, info: ValidationInfo) -> ScheduleRequest:
        now: datetime | None = (info.context or {}).get("now")
        if self.end <= self.start:
            raise _field_error("end", "must be after start")
        if now is not None and self.end <= now:
            raise _field_error("end", "must be in the future")
        return self


class BookingRef(_Request):
    model_config = ConfigDict(extra="forbid")

    booking_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]


def _settings(info: ValidationInfo) -> Settings:
    """The settings a rule needs, from the validation context (a face that forgets them is a bug,
    raised as such, not a caller's broken rule)."""
    settings = (info.context or {}).get("settings")
    if not isinstance(settings, Settings):
        raise LookupError("this check needs the running settings in the validation context (settings=...)")
    return settings


def _field_error(field: str, rule: str) -> PydanticCustomError:
    """Raised inside a model validator to blame one of the model's fields by name (see `problems`)."""
    return PydanticCustomError("sub_field", "{rule}", {"field": field, "rule": rule})


_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def _name(part: Any) -> str:
    # A field name the caller sent with a NUL in it is shown escaped, not echoed raw.
    text = str(part)
    return repr(text) if unstorable(text) else text


def problems(exc: ValidationError) -> list[FieldRule]:
    """(field, rule) for every broken rule, the field dotted (`room.room_mode`, `metadata.notes.0`)."""
    found: list[FieldRule] = []
    for error in exc.errors():
        loc = [_name(part) for part in error["loc"]]
        if error["type"] == "unstorable_text":
            for path, rule in error["ctx"]["problems"]:
                found.append((".".join([*loc, *path]), rule))
            continue
        if error["type"] == "sub_field":  # a model's own rule about one of its fields
            found.append((".".join([*loc, error["ctx"]["field"]]), error["ctx"]["rule"]))
            continue
        message = _PREFIX.sub("", error["msg"])
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "is required"
        found.append((".".join(loc), message))
    return found


def parse(model: type[M], data: Any, **context: Any) -> M:
    """Build `model` from `data`, or raise InvalidRequest naming every broken rule."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRequest(problems(exc)) from None


def validate(model: type[M], args: tuple[Any, ...], kwargs: dict[str, Any], **context: Any) -> M:
    """Build `model` from a task call's arguments, or raise InvalidRequest naming every broken rule."""
    if args:
        raise InvalidRequest([("", "arguments must be sent as keyword arguments (kwargs), not positionally")])
    return parse(model, kwargs, **context)
