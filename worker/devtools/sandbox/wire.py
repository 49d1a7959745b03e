"""The sandbox's shared vocabulary: a reply, the refusal of a bad request, Whereby's timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class BadRequest(ValueError):
    """A request the sandbox refuses; the message is "<field>: <rule>"."""


@dataclass
class Reply:
    """What the HTTP layer sends back; stall is a delay before sending it."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": message}, headers or {})


def iso(moment: datetime) -> str:
    # Whereby answers in UTC with millisecond precision and a Z.
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def iso_ts(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts, UTC))
