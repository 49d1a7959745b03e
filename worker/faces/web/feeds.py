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


@router.get("", summary="every feed, with its last poll")
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


@router.get("/{name}", summary="one feed: its last polls, outcome, changes and bookings")
async def show_feed(name: FeedName) -> Any:
    return await run_in_threadpool(registry.show_feed, name)


@router.delete("/{name}", summary="remove a feed; its bookings not yet ended are cancelled")
async def remove_feed(name: FeedName) -> Any:
    return await run_in_threadpool(registry.remove_feed, name)


@router.post("/{name}/sync", summary="poll the feed now")
async def sync_feed(name: FeedName, force: Annotated[bool, Query()] = False) -> Any:
    return await run_in_threadpool(lambda: sync.sync_feed(name, force=force))
