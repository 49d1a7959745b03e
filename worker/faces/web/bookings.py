"""`/v1/bookings` (CONTRACT §4.2): book, reschedule, read, cancel, list and import bookings over HTTP.

Thin like the tasks: each route checks the bearer token (`require_token`), validates the body with
the very model the Celery tasks use (`worker.rules.validation.ScheduleRequest`, so the rules and their
messages are the same), calls the same domain function in a worker thread (they block on the
store), and returns what its response model describes. Bodies are read and validated here rather
than by FastAPI, so that every refusal names its field exactly as `rooms.schedule_meeting` would;
the OpenAPI document still describes them (`openapi_extra`, from the same models). Refusals are
raised (InvalidRequest, UnknownBooking, Refused) and answered by worker/faces/web/problems.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from config.settings import get_settings
from worker.adapters import outbound
from worker.faces.web import bodies
from worker.faces.web.auth import UNAUTHORIZED, require_token
from worker.faces.web.problems import MEDIA_TYPE, RESPONSES, FieldProblem, Problem
from worker.faces.web.shapes import Instant
from worker.jobs import batch, booking
from worker.rules.lifecycle import fmt
from worker.rules.validation import BookingRef, InvalidRequest, ScheduleRequest, parse
from worker.store.models import MeetingState, utcnow

router = APIRouter(prefix="/v1/bookings", tags=["bookings"], dependencies=[Depends(require_token)])

# A full batch is 1,000 bookings of at most 4 KiB of metadata each: about 4.5 MB.
MAX_BODY = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Shapes of the answers (the views themselves come from worker/store/journal.py).


class RoomView(BaseModel):
    meeting_id: str | None
    room_name: str | None
    room_url: str | None
    host_room_url: str | None
    viewer_room_url: str | None
    end_date: Instant | None


class OccupancyView(BaseModel):
    participants: int
    since: Instant | None


class MeetingView(BaseModel):
    """The meeting view (CONTRACT §2.4). More keys may be added: ignore the ones you do not know."""

    model_config = ConfigDict(extra="allow")

    booking_id: str
    state: MeetingState
    start: Instant
    end: Instant
    room: RoomView | None
    occupancy: OccupancyView | None = None
    metadata: dict[str, Any]
    last_error: str | None
    created_at: Instant
    updated_at: Instant


class BookingPage(BaseModel):
    results: list[MeetingView]
    cursor: str | None = Field(description="pass it back as `cursor` for the next page; null on the last one")


class HistoryEntry(BaseModel):
    at: Instant
    kind: str = Field(description="state | whereby | event | note (more may be added)")
    action: str
    outcome: str


class BatchStored(BaseModel):
    ok: Literal[True]
    created: bool = Field(description="true: a new booking (a PUT's 201); false: an existing one rescheduled")
    view: MeetingView


class BatchRefused(BaseModel):
    ok: Literal[False]
    errors: list[FieldProblem] = Field(
        description="this item's own errors; `field` is named within the item (`end`, `room.room_mode`)"
    )


class BatchAnswer(BaseModel):
    results: list[BatchStored | BatchRefused] = Field(description="one per item of `bookings`, in order")


# --------------------------------------------------------------------------------------------
# Request bodies, described from the models that validate them.


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """The schema with every local `$ref` replaced by its definition (the models do not recurse)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def _schedule_schema() -> dict[str, Any]:
    schema = ScheduleRequest.model_json_schema()
    defs = schema.pop("$defs", {})
    return dict(_inline(schema, defs))


def _put_schema() -> dict[str, Any]:
    schema = _schedule_schema()
    schema["required"] = [name for name in schema.get("required", []) if name != "booking_id"]
    schema["properties"]["booking_id"] = {
        **schema["properties"]["booking_id"],
        "description": "optional: the path names the booking; if given, it must be the same",
    }
    schema["title"] = "Booking"
    return schema


def _batch_schema() -> dict[str, Any]:
    return {
        "title": "Batch",
        "type": "object",
        "properties": {
            "bookings": {
                "type": "array",
                "maxItems": batch.MAX_ITEMS,
                "items": _schedule_schema(),
                "description": "up to 1,000 PUT bodies, each with its booking_id",
            }
        },
        "required": ["bookings"],
        "additionalProperties": False,
    }


EXAMPLE = {
    "start": "2099-12-01T09:00:00+01:00",
    "end": "2099-12-01T09:45:00+01:00",
    "room": {"room_mode": "group", "fields": ["hostRoomUrl"]},
    "metadata": {"patient": "p-42"},
}
BATCH_EXAMPLE = {
    "bookings": [
        {"booking_id": "booking-8812", **EXAMPLE},
        {"booking_id": "booking-8813", "start": "2099-12-01T10:00:00Z", "end": "2099-12-01T10:30:00Z"},
    ]
}


def _body(schema: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


BookingId = Annotated[
    str, Path(description="the caller's own key, 1 to 200 characters", examples=["booking-8812"])
]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        404: "no booking has this booking_id",
        413: "body too large",
    }
    out: dict[int | str, dict[str, Any]] = {**UNAUTHORIZED, **RESPONSES}
    for status in statuses:
        out[status] = {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": described[status]}
    return out


# --------------------------------------------------------------------------------------------
# Helpers. An error is raised, never answered here: problems.install maps each to problem+json.


async def _json_object(request: Request) -> dict[str, Any]:
    # Read with a limit, so a body far larger than any batch is refused without being held whole.
    return await bodies.json_object(request, MAX_BODY)


def _ref(booking_id: str) -> str:
    return parse(BookingRef, {"booking_id": booking_id}).booking_id


def _encode_cursor(key: tuple[datetime, int]) -> str:
    # Full precision: the key must be exactly the row's, or a page would repeat its last rows.
    text = json.dumps([key[0].isoformat(), key[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        start, pk = json.loads(text)
        if not isinstance(pk, int) or isinstance(pk, bool) or not isinstance(start, str):
            raise ValueError(cursor)
        at = datetime.fromisoformat(start)
        if at.tzinfo is None:
            raise ValueError(cursor)
        return at, pk
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest([("cursor", "is not a cursor this service gave out")]) from None


def _schedule(request: ScheduleRequest) -> tuple[dict[str, Any], bool]:
    view = booking.schedule_meeting(request)
    # A new booking is stored with created_at = updated_at; a reschedule moves updated_at on.
    return view, view["created_at"] == view["updated_at"]


def _history(booking_id: str) -> list[dict[str, Any]]:
    booking.get_meeting(booking_id)  # UnknownBooking: 404
    return [
        {"at": fmt(entry.at), "kind": entry.kind, "action": entry.action, "outcome": entry.outcome}
        for entry in booking.history(booking_id)
    ]


# --------------------------------------------------------------------------------------------
# Routes. Static paths first: `{booking_id:path}` would match them too (ids may hold a "/").


@router.get(
    "",
    summary="List bookings, soonest first",
    response_model=BookingPage,
    responses=_errors(),
)
async def list_bookings(
    state: Annotated[MeetingState | None, Query(description="only bookings in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="at most this many (1 to 500)")] = 100,
    cursor: Annotated[str | None, Query(description="the `cursor` of the previous page")] = None,
) -> dict[str, Any]:
    after = _decode_cursor(cursor) if cursor is not None else None
    views, last = await run_in_threadpool(booking.list_page, state, limit, after)
    return {"results": views, "cursor": _encode_cursor(last) if last else None}


@router.post(
    "/batch",
    summary="Book or reschedule up to 1,000 bookings: one result per item, in order",
    description=(
        "Each item is a PUT body with its `booking_id`, validated on its own: a bad item gets its own "
        "errors and never blocks the others. A booking_id that appears twice in one batch is stored "
        "from its first item; the later ones are refused. Nothing of a refused item is stored."
    ),
    response_model=BatchAnswer,
    responses=_errors(413),
    openapi_extra=_body(_batch_schema(), BATCH_EXAMPLE),
)
async def schedule_batch(request: Request) -> dict[str, Any]:
    parsed = parse(batch.ScheduleBatch, await _json_object(request))
    results = await run_in_threadpool(lambda: batch.schedule_many(parsed.bookings, over_http=True))
    return {"results": results}


@router.get(
    "/{booking_id:path}/history",
    summary="Every state change, Whereby call and event of one booking, oldest first",
    response_model=list[HistoryEntry],
    responses=_errors(404),
)
async def booking_history(booking_id: BookingId) -> list[dict[str, Any]]:
    return await run_in_threadpool(_history, _ref(booking_id))


@router.put(
    "/{booking_id:path}",
    summary="Book (201) or reschedule (200) one booking",
    status_code=201,
    response_model=MeetingView,
    responses={
        200: {"model": MeetingView, "description": "an existing booking, rescheduled"},
        **_errors(413),
    },
    openapi_extra=_body(_put_schema(), EXAMPLE),
)
async def put_booking(booking_id: BookingId, request: Request, response: Response) -> dict[str, Any]:
    data = await _json_object(request)
    if "booking_id" in data and data["booking_id"] != booking_id:
        raise InvalidRequest([("booking_id", "must be the booking_id of the path (or left out)")])
    data["booking_id"] = booking_id
    settings = get_settings()
    schedule = parse(
        ScheduleRequest,
        data,
        caller_prefix_max=settings.caller_prefix_max,
        over_http=True,
        settings=settings,
        now=utcnow(),
        check_url=outbound.check_url,
    )
    view, created = await run_in_threadpool(_schedule, schedule)
    if not created:
        response.status_code = 200
    return view


@router.get(
    "/{booking_id:path}",
    summary="One booking's view",
    response_model=MeetingView,
    responses=_errors(404),
)
async def get_booking(booking_id: BookingId) -> dict[str, Any]:
    return await run_in_threadpool(booking.get_meeting, _ref(booking_id))


@router.delete(
    "/{booking_id:path}",
    summary="Cancel a booking: its room, if any, is deleted now (cancelling again is not an error)",
    response_model=MeetingView,
    responses=_errors(404),
)
async def cancel_booking(booking_id: BookingId) -> dict[str, Any]:
    return await run_in_threadpool(booking.cancel_meeting, _ref(booking_id))
