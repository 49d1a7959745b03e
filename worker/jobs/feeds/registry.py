"""The feeds an operator manages: add (validated), list, show, remove, and their stored secrets.

`worker/jobs/feeds/sync.py` reads and applies them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import col, delete, select

from config.settings import get_settings
from worker.adapters import outbound
from worker.adapters.calendars import limits, source
from worker.adapters.outbound import OutboundRefused, check_url
from worker.jobs import booking
from worker.rules.lifecycle import fmt
from worker.rules.validation import (
    MAX_URL_LENGTH,
    InvalidRequest,
    Notify,
    RoomOptions,
    problems,
    unstorable,
)
from worker.store import session_scope
from worker.store.models import Feed, FeedOccurrence, utcnow

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
MAX_HORIZON_DAYS = 366
HISTORY_KEEP = 50
MAX_PASSWORD = 1024


class FeedError(InvalidRequest):
    """A feed operation was refused; the message names the field and the rule."""


class UnknownFeed(FeedError):
    """No feed has this name."""


class FeedLimit(FeedError):
    """The service holds as many feeds as it may."""


@dataclass
class FeedSpec:
    name: str
    url: str
    match: str | None = None
    horizon_days: int = 14
    room: dict[str, Any] | None = None
    notify: dict[str, Any] | None = None
    username: str | None = None
    password_env: str | None = None
    password: str | None = None
    timezone: str = "UTC"
    caldav: bool = False


def _validated(spec: FeedSpec, over_http: bool) -> dict[str, Any]:
    errors: list[str] = []
    settings = get_settings()
    if not isinstance(spec.name, str) or not NAME.match(spec.name):
        errors.append(
            "name: must be 1 to 50 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    if not isinstance(spec.url, str) or unstorable(spec.url) or len(spec.url) > MAX_URL_LENGTH:
        errors.append(f"url: must be at most {MAX_URL_LENGTH} characters of storable text")
    else:
        try:
            check_url(spec.url, settings)
        except OutboundRefused as exc:
            errors.append(f"url: {exc}")
    if spec.match is not None:
        if rule := unstorable(spec.match):
            errors.append(f"match: {rule}")
        elif not spec.match.strip() or len(spec.match) > 200:
            errors.append("match: must be 1 to 200 characters")
    if not isinstance(spec.horizon_days, int) or not 1 <= spec.horizon_days <= MAX_HORIZON_DAYS:
        errors.append(f"horizon_days: must be a whole number from 1 to {MAX_HORIZON_DAYS}")
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        errors.append(f"timezone: {spec.timezone!r} is not a known IANA time zone")
    room: dict[str, Any] = {}
    try:
        room = RoomOptions.model_validate(spec.room or {}).model_dump(exclude_none=True)
    except ValidationError as exc:
        errors.extend(f"room.{field}: {rule}" if field else f"room: {rule}" for field, rule in problems(exc))
    notify = None
    if spec.notify is not None:
        try:
            notify = Notify.model_validate(
                spec.notify,
                context={"over_http": over_http, "settings": settings, "check_url": outbound.check_url},
            ).model_dump()
        except ValidationError as exc:
            errors.extend(
                f"notify.{field}: {rule}" if field else f"notify: {rule}" for field, rule in problems(exc)
            )
    if over_http and spec.password_env is not None:
        # The service would read the variable and send it to a URL of the caller's choosing.
        errors.append(
            "password_env: is an operator's option of `roomkeeper feeds add`, not accepted over HTTP; "
            "send the password itself (it is stored encrypted)"
        )
    elif spec.password_env is not None and not ENV_NAME.match(spec.password_env):
        errors.append("password_env: must be the name of an environment variable")
    if spec.password_env is not None and spec.username is None:
        errors.append("username: is required with password_env")
    password_enc = None
    if spec.password is not None:
        if spec.password_env is not None:
            errors.append("password: give either password or password_env, not both")
        elif spec.username is None:
            errors.append("username: is required with password")
        elif settings.secret_key is None:
            errors.append(
                "password: storing a password needs ROOMKEEPER_SECRET_KEY on the service; "
                "or name an environment variable that holds it (password_env)"
            )
        elif not isinstance(spec.password, str) or unstorable(spec.password) or not spec.password:
            errors.append("password: must be non-empty storable text")
        elif len(spec.password) > MAX_PASSWORD:
            errors.append(f"password: must be at most {MAX_PASSWORD} characters")
        else:
            password_enc = _fernet().encrypt(spec.password.encode()).decode()
    if spec.username is not None and (unstorable(spec.username) or len(spec.username) > 200):
        errors.append("username: must be at most 200 storable characters")
    if errors:
        raise FeedError("; ".join(errors))
    caldav = spec.caldav or spec.username is not None
    return {
        "name": spec.name,
        "url": spec.url,
        "kind": "caldav" if caldav else "ics",
        "match": spec.match,
        "horizon_days": spec.horizon_days,
        "timezone": spec.timezone,
        "room": room,
        "notify": notify,
        "username": spec.username,
        "password_env": spec.password_env,
        "password_enc": password_enc,
    }


def _fernet() -> Any:
    from cryptography.fernet import Fernet

    key = get_settings().secret_key
    if key is None:
        raise source.FetchError(
            "the feed's password is stored encrypted and ROOMKEEPER_SECRET_KEY is not set"
        )
    return Fernet(key.get_secret_value())


def password_of(encrypted: str | None) -> str | None:
    if encrypted is None:
        return None
    from cryptography.fernet import InvalidToken

    try:
        return str(_fernet().decrypt(encrypted.encode()).decode())
    except InvalidToken:
        raise source.FetchError("the stored password does not decrypt with ROOMKEEPER_SECRET_KEY") from None


def describe(feed: Feed) -> dict[str, Any]:
    """The feed as shown (CLI, HTTP): never a credential, only the name of its variable."""
    return {
        "name": feed.name,
        "url": feed.url,
        "kind": feed.kind,
        "match": feed.match,
        "horizon_days": feed.horizon_days,
        "timezone": feed.timezone,
        "room": feed.room,
        "notify": feed.notify,
        "username": feed.username,
        "password_env": feed.password_env,
        "password": "stored encrypted" if feed.password_enc else None,
        "created_at": fmt(feed.created_at),
        "last_poll_at": fmt(feed.last_poll_at) if feed.last_poll_at else None,
        "last_outcome": feed.last_outcome,
        "last_detail": feed.last_detail,
        "last_changes": feed.last_changes,
        "occurrences": feed.occurrence_count,
        "downloads": feed.downloads,
        "not_modified": feed.not_modified,
        "next_poll_at": fmt(feed.next_poll_at) if feed.next_poll_at else None,
    }


def add_feed(spec: FeedSpec, *, over_http: bool = False) -> dict[str, Any]:
    """Store a new feed. `over_http`: the caller is a token holder, not the operator: no
    environment variable (`password_env`) and no notify task unless the operator lists it."""
    fields = _validated(spec, over_http)
    now = utcnow()
    limit = get_settings().feed_max_count
    with session_scope() as session:
        if session.execute(select(Feed).where(Feed.name == spec.name)).scalar_one_or_none():
            raise FeedError(f"name: a feed named {spec.name!r} exists already")
        held = session.execute(select(func.count()).select_from(Feed)).scalar_one()
        if held >= limit:
            raise FeedLimit(f"name: this service keeps at most {limit} feeds (ROOMKEEPER_FEED_MAX_COUNT)")
        feed = Feed(created_at=now, next_poll_at=now, history=[], **fields)
        session.add(feed)
        session.flush()
        result = describe(feed)
    log.info("feed %s: added (%s)", spec.name, fields["kind"])
    return result


def known(session: Any, name: str) -> Feed:
    feed = session.execute(select(Feed).where(Feed.name == name)).scalar_one_or_none()
    if feed is None:
        raise UnknownFeed(f"name: no feed named {name!r}")
    return feed


def list_feeds() -> list[dict[str, Any]]:
    with session_scope() as session:
        return [describe(feed) for feed in session.execute(select(Feed).order_by(col(Feed.name))).scalars()]


def show_feed(name: str) -> dict[str, Any]:
    with session_scope() as session:
        feed = known(session, name)
        result = describe(feed)
        result["limits"] = limits.describe(get_settings())
        result["history"] = list(feed.history or [])
        result["bookings"] = [
            {"booking_id": row.booking_id, "start": fmt(row.start), "end": fmt(row.end)}
            for row in session.execute(
                select(FeedOccurrence)
                .where(FeedOccurrence.feed_id == feed.id)
                .order_by(col(FeedOccurrence.start))
            ).scalars()
        ]
        return result


def remove_feed(name: str) -> dict[str, Any]:
    """Forget the feed; the bookings it made that have not ended are cancelled."""
    now = utcnow()
    with session_scope() as session:
        feed = known(session, name)
        rows = list(
            session.execute(select(FeedOccurrence).where(FeedOccurrence.feed_id == feed.id)).scalars()
        )
        session.execute(delete(FeedOccurrence).where(col(FeedOccurrence.feed_id) == feed.id))
        session.delete(feed)
    cancelled = 0
    for row in rows:
        if row.end > now and cancel_booking(row.booking_id):
            cancelled += 1
    log.info("feed %s: removed, %d booking(s) cancelled", name, cancelled)
    return {"name": name, "removed": True, "cancelled": cancelled}


def cancel_booking(booking_id: str) -> bool:
    try:
        booking.cancel_meeting(booking_id)
    except InvalidRequest as exc:
        log.info("feed booking %s: not cancelled: %s", booking_id, exc)
        return False
    return True
