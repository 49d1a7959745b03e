"""From an iCalendar text to the occurrences in a window: parsing, expansion, zones, filtering.

The parsing is icalendar's and the expansion recurring-ical-events' (RRULE with COUNT and UNTIL,
RDATE, EXDATE, RECURRENCE-ID overrides); this module decides what counts as a bookable occurrence,
names it, and keeps a hostile calendar within the bounds of `calendars/limits.py`: series finer
than MAX_PER_DAY a day are skipped, a series that started long ago is moved up to the horizon before
it is expanded (so no rule steps through years of past occurrences), occurrences are capped per
series and per feed, and the deadline is checked between series. Every skip is reported.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import icalendar
import recurring_ical_events

from worker.adapters.calendars import limits

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


@dataclass
class Expansion:
    """The occurrences to book, and what was left out (and why)."""

    found: dict[str, Occurrence] = field(default_factory=dict)
    skipped_series: int = 0
    skipped_occurrences: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)


_PERIOD = {
    "HOURLY": timedelta(hours=1),
    "DAILY": timedelta(days=1),
    "WEEKLY": timedelta(days=7),
    "MONTHLY": timedelta(days=28),  # the shortest month: estimates err towards more steps
    "YEARLY": timedelta(days=365),
}
# The parts that make several occurrences within one period of each frequency (others only filter).
_TIME = ("BYHOUR", "BYMINUTE", "BYSECOND")
_EXPANDING = {
    "HOURLY": ("BYMINUTE", "BYSECOND"),
    "DAILY": _TIME,
    "WEEKLY": ("BYDAY", *_TIME),
    "MONTHLY": ("BYMONTHDAY", "BYDAY", *_TIME),
    "YEARLY": ("BYMONTH", "BYWEEKNO", "BYYEARDAY", "BYMONTHDAY", "BYDAY", *_TIME),
}
_BY_PARTS = frozenset(part for parts in _EXPANDING.values() for part in parts) | {"BYSETPOS"}


def _rules(component: Any) -> list[Any]:
    value = component.get("RRULE")
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _count(rule: Any, key: str) -> int:
    value = rule.get(key)
    return max(1, len(value)) if isinstance(value, list) else 1


def _first(rule: Any, key: str, default: Any) -> Any:
    value = rule.get(key)
    if isinstance(value, list) and value:
        return value[0]
    return default if value is None else value


def _interval(rule: Any) -> int:
    try:
        return max(1, int(_first(rule, "INTERVAL", 1)))
    except (TypeError, ValueError):
        return 1


def per_day(rule: Any) -> float:
    """The most occurrences one day of this rule can hold."""
    freq = str(_first(rule, "FREQ", "")).upper()
    if freq in ("SECONDLY", "MINUTELY"):
        return math.inf
    times = _count(rule, "BYMINUTE") * _count(rule, "BYSECOND")
    if freq == "HOURLY":
        hours = 24 / _interval(rule)
        if isinstance(rule.get("BYHOUR"), list):
            hours = min(hours, len(rule["BYHOUR"]))
        return hours * times
    return _count(rule, "BYHOUR") * times / (_interval(rule) if freq == "DAILY" else 1)


def _steps_before(rule: Any, start: datetime, horizon: datetime) -> float:
    """About how many candidate instants the rule steps through from `start` to `horizon`."""
    freq = str(_first(rule, "FREQ", "")).upper()
    period = _PERIOD.get(freq)
    if period is None or horizon <= start:
        return 0
    periods = (horizon - start) / (period * _interval(rule))
    # BYDAY in a month or year is up to five of each weekday named.
    many = math.prod(_count(rule, key) for key in _EXPANDING[freq])
    if freq in ("MONTHLY", "YEARLY") and isinstance(rule.get("BYDAY"), list):
        many *= 5 if freq == "MONTHLY" else 53
    steps = periods * many
    count = rule.get("COUNT")
    if isinstance(count, list) and count and isinstance(count[0], int):
        steps = min(steps, count[0])
    return steps


def _move_up(component: Any, rule: Any, start: datetime, horizon: datetime) -> bool:
    """Move a series that began long before `horizon` up to just before it, whole periods at a
    time (wall-clock, as the rule steps), so its occurrences in the horizon are the same but
    expanding them steps through none of the years before. False when the series ended before."""
    freq = str(_first(rule, "FREQ", "")).upper()
    if freq not in ("HOURLY", "DAILY", "WEEKLY"):
        return True
    has_count = isinstance(rule.get("COUNT"), list)
    if has_count and any(key in rule for key in _BY_PARTS):
        return True  # COUNT would have to be re-counted: left as is (bounded by MAX_STEPS_BEFORE)
    step = _PERIOD[freq] * _interval(rule)
    periods = int((horizon - start) // step) - 1
    if periods <= 0:
        return True
    if has_count:
        left = int(rule["COUNT"][0]) - periods
        if left < 1:
            return False
        rule["COUNT"] = [left]
    moved = step * periods
    component["DTSTART"] = icalendar.vDDDTypes(_dt(component, "DTSTART") + moved)
    end = _dt(component, "DTEND")
    if isinstance(end, datetime):
        component["DTEND"] = icalendar.vDDDTypes(end + moved)
    return True


def _dt(component: Any, name: str) -> Any:
    """The value of a date-time property, None when missing or unreadable."""
    try:
        return getattr(component.get(name), "dt", None)
    except Exception:  # icalendar's vBroken raises on .dt
        return None


def _guard(calendar: icalendar.Calendar, zone: tzinfo, window_start: datetime, out: Expansion) -> None:
    """Skip (and report) the series a sync must not expand; move old series up to the horizon."""
    horizon = window_start - timedelta(days=2)
    dropped: set[str] = set()
    for component in list(calendar.subcomponents):
        if component.name != "VEVENT":
            continue
        rules = _rules(component)
        if not rules:
            continue
        uid = _text(component, "UID")
        if not all(isinstance(rule, icalendar.vRecur) for rule in rules):
            dropped.add(uid)
            out.skipped_series += 1
            out.note(f"series {uid[:100]!r} skipped: its RRULE does not parse")
            continue
        start_value = _dt(component, "DTSTART")
        if not isinstance(start_value, datetime):
            continue  # all-day (never booked), or no start: left to the expansion's own rules
        start = _aware(start_value, zone)
        why = None
        for rule in rules:
            if per_day(rule) > limits.MAX_PER_DAY:
                freq = str(_first(rule, "FREQ", "?")).upper()
                why = f"FREQ={freq} makes more than {limits.MAX_PER_DAY} occurrences a day"
                break
        try:
            if why is None and len(rules) == 1 and not _move_up(component, rules[0], start, horizon):
                dropped.add(uid)  # its COUNT ran out before the horizon: nothing to book, nothing to say
                continue
            if why is None:
                start = _aware(_dt(component, "DTSTART"), zone)
                steps = max(_steps_before(rule, start, horizon) for rule in rules)
                if steps > limits.MAX_STEPS_BEFORE:
                    why = f"its rule would step through about {steps:,.0f} occurrences before the horizon"
        except Exception:  # a property icalendar could not read (DTEND, COUNT, …)
            why = "a property of the series does not parse"
        if why is not None:
            dropped.add(uid)
            out.skipped_series += 1
            out.note(f"series {uid[:100]!r} skipped: {why}")
    if dropped:
        calendar.subcomponents = [
            c for c in calendar.subcomponents if c.name != "VEVENT" or _text(c, "UID") not in dropped
        ]


def expand(
    calendar: icalendar.Calendar,
    feed: str,
    window_start: datetime,
    window_end: datetime,
    *,
    match: str | None = None,
    timezone: str = "UTC",
    deadline: limits.Deadline | None = None,
) -> Expansion:
    """Every bookable occurrence that overlaps [window_start, window_end], by booking_id, within the
    bounds of worker/adapters/calendars/limits.py (what they left out is counted and noted).

    Skipped: all-day events (a DTSTART that is a date), cancelled events and occurrences
    (STATUS:CANCELLED), occurrences without a positive length, those not matching `match`
    (case-insensitive, in SUMMARY, LOCATION or DESCRIPTION). Floating times are in the calendar's
    X-WR-TIMEZONE, else in `timezone`. Raises limits.DeadlinePassed past `deadline`."""
    zone = zone_of(calendar, timezone)
    out = Expansion()
    _guard(calendar, zone, window_start, out)
    if deadline is not None:
        deadline.check("reading the series")
    # A day of margin both ways: floating times are placed in the zone only afterwards.
    lo, hi = window_start - timedelta(days=1), window_end + timedelta(days=1)
    query = recurring_ical_events.of(calendar, components=["VEVENT"])
    kept: list[Occurrence] = []
    for series in query.series:
        if deadline is not None:
            deadline.check("expanding the series")
        found: list[Occurrence] = []
        beyond = 0
        for index, occurrence in enumerate(series.between(lo, hi)):
            if deadline is not None and index % 200 == 199:
                deadline.check("expanding the series")
            if len(found) > limits.MAX_PER_SERIES:
                beyond += 1  # counted, not built: the rule yields in time order
                continue
            one = _bookable(
                occurrence.as_component(query.keep_recurrence_attributes),
                feed,
                window_start,
                window_end,
                match,
                zone,
            )
            if one is not None:
                found.append(one)
        found.sort(key=lambda o: o.start)
        if len(found) > limits.MAX_PER_SERIES:
            extra = len(found) - limits.MAX_PER_SERIES + beyond
            out.skipped_occurrences += extra
            out.note(
                f"series {found[0].uid[:100]!r}: more than {limits.MAX_PER_SERIES} occurrences in the "
                f"horizon; the soonest {limits.MAX_PER_SERIES} booked, {extra} skipped"
            )
            found = found[: limits.MAX_PER_SERIES]
        kept.extend(found)
        if len(kept) > 2 * limits.MAX_PER_FEED:
            kept = _cap_feed(kept, out)
    for one in _cap_feed(kept, out):
        out.found[one.booking_id] = one
    return out


def _cap_feed(kept: list[Occurrence], out: Expansion) -> list[Occurrence]:
    kept.sort(key=lambda o: (o.start, o.booking_id))
    if len(kept) <= limits.MAX_PER_FEED:
        return kept
    extra = len(kept) - limits.MAX_PER_FEED
    out.skipped_occurrences += extra
    out.note(f"feed: more than {limits.MAX_PER_FEED} occurrences in the horizon; {extra} later ones skipped")
    return kept[: limits.MAX_PER_FEED]


def occurrences(
    calendar: icalendar.Calendar,
    feed: str,
    window_start: datetime,
    window_end: datetime,
    *,
    match: str | None = None,
    timezone: str = "UTC",
) -> dict[str, Occurrence]:
    """`expand(...).found`: the bookable occurrences by booking_id."""
    return expand(calendar, feed, window_start, window_end, match=match, timezone=timezone).found


def _bookable(
    component: Any,
    feed: str,
    window_start: datetime,
    window_end: datetime,
    match: str | None,
    zone: tzinfo,
) -> Occurrence | None:
    start_prop = component.get("DTSTART")
    if start_prop is None:
        return None
    start_value = start_prop.dt
    if not isinstance(start_value, datetime) and isinstance(start_value, date):
        return None  # all-day
    if _text(component, "STATUS").upper() == "CANCELLED":
        return None
    if not matches(component, match):
        return None
    start = _aware(start_value, zone)
    end_prop = component.get("DTEND")
    if end_prop is not None and isinstance(end_prop.dt, datetime):
        end = _aware(end_prop.dt, zone)
    elif component.get("DURATION") is not None:
        end = start + component["DURATION"].dt
    else:
        return None  # no length: nothing to meet in
    if end <= start or end <= window_start or start > window_end:
        return None
    uid = _text(component, "UID")
    if not uid:
        return None
    recurrence = component.get("RECURRENCE-ID")
    key = start
    if recurrence is not None and isinstance(recurrence.dt, datetime):
        key = _aware(recurrence.dt, zone)
    bid = booking_id(feed, uid, key)
    return Occurrence(bid, uid, start, end, _text(component, "SUMMARY"))
