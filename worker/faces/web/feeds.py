"""`/v1/feeds` (CONTRACT §5): calendar feeds over HTTP, behind the same bearer tokens as bookings.

The same operations as `roomkeeper feeds …` (worker/jobs/feeds/sync.py), run in a worker thread, with
what a token holder may not do left out: no `password_env` (the service would send that variable to
the caller's URL: the password itself travels in the body and is stored encrypted), and no notify
task unless the operator lists it. The body is read only after the token is checked, with a bound.
A feed's view never holds a credential.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from worker.faces.web import bodies
from worker.faces.web.auth import UNAUTHORIZED, require_token
from worker.faces.web.problems import MEDIA_TYPE, RESPONSES, Problem
from worker.faces.web.shapes import Instant
from worker.jobs.feeds import registry, sync
from worker.rules.validation import InvalidRequest, parse

router = APIRouter(
    prefix="/v1/feeds", tags=["feeds"], dependencies=[Depends(require_token)], responses=UNAUTHORIZED
)

FeedName = Annotated[str, Path(min_length=1, max_length=50)]


class FeedBody(BaseModel):
    """A new feed: an ICS URL, or a CalDAV calendar (with `username` and `password`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-50 characters of A-Z a-z 0-9 _ - .; part of every booking_id")
    url: str = Field(description="the ICS URL or the CalDAV calendar's URL; obeys the outbound rules")
    match: str | None = Field(
        default=None, description="case-insensitive text in summary, location or description"
    )
    horizon_days: int = Field(default=14, description="occurrences this many days ahead are booked")
    timezone: str = Field(default="UTC", description="zone of floating times when the feed names none")
    room: dict[str, Any] | None = Field(default=None, description="room options of every booking, as in §2")
    notify: dict[str, Any] | None = Field(default=None, description="where the bookings' events go, as in §2")
    username: str | None = Field(default=None, description="CalDAV user name (makes the feed a CalDAV one)")
    password: str | None = Field(
        default=None,
        max_length=registry.MAX_PASSWORD,
        description="the CalDAV password, kept encrypted (needs ROOMKEEPER_SECRET_KEY); never shown",
    )
    caldav: bool = Field(default=False, description="read the URL as a CalDAV calendar")


# --------------------------------------------------------------------------------------------
# Shapes of the answers (the views themselves come from worker/jobs/feeds/registry.py's describe).


class FeedView(BaseModel):
    """A feed as shown: never a credential. More keys may be added: ignore the ones you do not know."""

    model_config = ConfigDict(extra="allow")

    name: str
    url: str
    kind: str = Field(description="ics | caldav")
    match: str | None
    horizon_days: int
    timezone: str
    room: dict[str, Any] | None
    notify: dict[str, Any] | None
    username: str | None
    password_env: str | None
    password: str | None = Field(description='"stored encrypted" when the feed has one; never the password')
    created_at: Instant
    last_poll_at: Instant | None
    last_outcome: str | None = Field(description="ok | failed | suspicious; null before the first poll")
    last_detail: str | None
    last_changes: dict[str, Any] | None
    occurrences: int
    downloads: int
    not_modified: int
    next_poll_at: Instant | None


class FeedBooking(BaseModel):
    booking_id: str
    start: Instant
    end: Instant


class FeedDetail(FeedView):
    limits: dict[str, Any] = Field(description="the bounds a feed is read within")
    history: list[dict[str, Any]] = Field(description="the last polls, oldest first")
    bookings: list[FeedBooking] = Field(description="the bookings the feed holds, soonest first")


class FeedList(BaseModel):
    results: list[FeedView]


class FeedRemoved(BaseModel):
    name: str
    removed: bool
    cancelled: int = Field(description="its bookings not yet ended, cancelled now")


# --------------------------------------------------------------------------------------------
# Routes.


@router.get("", summary="every feed, with its last poll", response_model=FeedList)
async def list_feeds() -> dict[str, Any]:
    return {"results": await run_in_threadpool(registry.list_feeds)}


# A feed's settings are a few hundred bytes; room and notify at most a few KiB.
MAX_BODY = 64 * 1024


def _feed_schema() -> dict[str, Any]:
    schema = FeedBody.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post(
    "",
    status_code=201,
    response_model=FeedView,
    responses={
        **RESPONSES,
        413: {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": "body too large"},
    },
    summary="add a feed",
    openapi_extra=_feed_schema(),
)
async def create_feed(request: Request) -> Any:
    # Read here, after the router's token check, rather than by FastAPI before it.
    data = await bodies.json_object(request, MAX_BODY)
    if "password_env" in data:
        raise InvalidRequest(
            [
                (
                    "password_env",
                    "is an operator's option of `roomkeeper feeds add`, not accepted over HTTP; "
                    "send the password itself (it is stored encrypted)",
                )
            ]
        )
    spec = registry.FeedSpec(**parse(FeedBody, data).model_dump())
    return await run_in_threadpool(lambda: registry.add_feed(spec, over_http=True))


@router.get(
    "/{name}", summary="one feed: its last polls, outcome, changes and bookings", response_model=FeedDetail
)
async def show_feed(name: FeedName) -> Any:
    return await run_in_threadpool(registry.show_feed, name)


@router.delete(
    "/{name}", summary="remove a feed; its bookings not yet ended are cancelled", response_model=FeedRemoved
)
async def remove_feed(name: FeedName) -> Any:
    return await run_in_threadpool(registry.remove_feed, name)


# No response model: the answer is the feed's view, or only `{name, last_outcome}` when the poll did
# not run (`busy`: another sync holds the feed; `removed` while it ran).
@router.post("/{name}/sync", summary="poll the feed now")
async def sync_feed(name: FeedName, force: Annotated[bool, Query()] = False) -> Any:
    return await run_in_threadpool(lambda: sync.sync_feed(name, force=force))
