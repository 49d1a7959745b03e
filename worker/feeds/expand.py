"""From an iCalendar text to the occurrences in a window: parsing, expansion, zones, filtering.

The parsing is icalendar's and the expansion recurring-ical-events' (RRULE with COUNT and UNTIL,
RDATE, EXDATE, RECURRENCE-ID overrides); this module only decides what counts as a bookable
occurrence and names it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import icalendar
import recurring_ical_events

MAX_BOOKING_ID = 200
# How the occurrence part of a booking_id is written: UTC, ISO 8601 basic format.
KEY_FORMAT = "%Y%m%dT%H%M%SZ"


class FeedContentError(ValueError):
    """The text is not a complete iCalendar document; the message says what is wrong."""


@dataclass(frozen=True)
class Occurrence:
    booking_id: str
    uid: str
    start: datetime
    end: datetime
    summary: str


def parse(text: str) -> icalendar.Calendar:
    """A complete VCALENDAR, or FeedContentError (HTML, truncated, not iCalendar at all)."""
    body = text.lstrip("\ufeff \t\r\n")
    if not body[:15].upper().startswith("BEGIN:VCALENDAR"):
        head = body[:200].lower()
        what = "HTML" if "<html" in head or "<!doctype" in head else "not iCalendar"
        raise FeedContentError(f"the feed answered {what} (no BEGIN:VCALENDAR)")
    if "END:VCALENDAR" not in body.rstrip().upper()[-200:]:
        raise FeedContentError("the feed is truncated (no END:VCALENDAR at its end)")
    try:
        calendar = icalendar.Calendar.from_ical(body)
    except Exception as exc:  # icalendar raises ValueError and others on malformed input
        raise FeedContentError(f"the feed does not parse as iCalendar: {type(exc).__name__}") from None
    if not isinstance(calendar, icalendar.Calendar):
        raise FeedContentError("the feed is not one VCALENDAR")
    return calendar


def zone_of(calendar: icalendar.Calendar, default: str) -> tzinfo:
    """The zone of floating times: the calendar's X-WR-TIMEZONE when known, else `default`."""
    for name in (str(calendar.get("X-WR-TIMEZONE") or "").strip(), default):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return UTC


def _aware(value: datetime, zone: tzinfo) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def booking_id(feed: str, uid: str, key: datetime) -> str:
    """`feed:{NAME}:{UID}:{RECURRENCE-ID or start, UTC}`; a UID that would not fit the 200
    characters of a booking_id (or holds a character the store cannot keep) is replaced by
    `sha256-` and the first 32 hex digits of its SHA-256."""
    stamp = key.astimezone(UTC).strftime(KEY_FORMAT)
    candidate = f"feed:{feed}:{uid}:{stamp}"
    if len(candidate) <= MAX_BOOKING_ID and "\x00" not in uid and uid.isprintable():
        return candidate
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"feed:{feed}:sha256-{digest}:{stamp}"


def _text(component: Any, name: str) -> str:
    value = component.get(name)
    return "" if value is None else str(value)


def matches(component: Any, match: str | None) -> bool:
    if not match:
        return True
    needle = match.casefold()
    return any(needle in _text(component, name).casefold() for name in ("SUMMARY", "LOCATION", "DESCRIPTION"))


def occurrences(
    calendar: icalendar.Calendar,
    feed: str,
    window_start: datetime,
    window_end: datetime,
    *,
    match: str | None = None,
    timezone: str = "UTC",
) -> dict[str, Occurrence]:
    """Every bookable occurrence that overlaps [window_start, window_end], by booking_id.

    Skipped: all-day events (a DTSTART that is a date), cancelled events and occurrences
    (STATUS:CANCELLED), occurrences without a positive length, those not matching `match`
    (case-insensitive, in SUMMARY, LOCATION or DESCRIPTION). Floating times are in the calendar's
    X-WR-TIMEZONE, else in `timezone`."""
    zone = zone_of(calendar, timezone)
    # A day of margin both ways: floating times are placed in the zone only afterwards.
    query = recurring_ical_events.of(calendar, components=["VEVENT"])
    found: dict[str, Occurrence] = {}
    for component in query.between(window_start - timedelta(days=1), window_end + timedelta(days=1)):
        start_prop = component.get("DTSTART")
        if start_prop is None:
            continue
        start_value = start_prop.dt
        if not isinstance(start_value, datetime) and isinstance(start_value, date):
            continue  # all-day
        if _text(component, "STATUS").upper() == "CANCELLED":
            continue
        if not matches(component, match):
            continue
        start = _aware(start_value, zone)
        end_prop = component.get("DTEND")
        if end_prop is not None and isinstance(end_prop.dt, datetime):
            end = _aware(end_prop.dt, zone)
        elif component.get("DURATION") is not None:
            end = start + component["DURATION"].dt
        else:
            continue  # no length: nothing to meet in
        if end <= start or end <= window_start or start > window_end:
            continue
        uid = _text(component, "UID")
        if not uid:
            continue
        recurrence = component.get("RECURRENCE-ID")
        key = start
        if recurrence is not None and isinstance(recurrence.dt, datetime):
            key = _aware(recurrence.dt, zone)
        bid = booking_id(feed, uid, key)
        found[bid] = Occurrence(bid, uid, start, end, _text(component, "SUMMARY"))
    return found
