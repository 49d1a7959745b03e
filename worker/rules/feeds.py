"""What a feed's poll means (CONTRACT §5): whether a read is trusted, which event it sends, when
the feed is read next.

A poll's outcome is `ok`, `failed` (the read failed, or is not a complete calendar) or `suspicious`
(most of what was booked vanished at once). The feed tells its notify once when it enters a failed
or suspicious run, and once (`feed.recovered`) when an ok poll ends it; the polls in between send
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

UNHEALTHY = ("failed", "suspicious")
# A loss is suspicious when more than MASS_LOSS_MIN occurrences vanish at once, more than half of
# those booked, and what is left is under half of them.
MASS_LOSS_MIN = 3
# The longest an ICS feed's Cache-Control max-age delays its next poll: the horizon must move on.
MAX_AGE_CAP_SECONDS = 3600


def feed_event(previous: str | None, outcome: str) -> str | None:
    """The event a poll sends, from the outcome of the poll before it: `feed.failed` or
    `feed.suspicious` when the feed enters that state, `feed.recovered` when an ok poll ends a
    failed or suspicious run, nothing while the state holds."""
    if outcome in UNHEALTHY:
        return None if previous == outcome else f"feed.{outcome}"
    if outcome == "ok" and previous in UNHEALTHY:
        return "feed.recovered"
    return None


Span = tuple[datetime, datetime]
Action = Literal["unchanged", "book", "rebook"]


@dataclass(frozen=True)
class Comparison:
    """What a complete read means for the occurrences booked before it."""

    live: dict[str, Span]  # booked and not yet ended
    ended: list[str]  # booked and over: simply forgotten, their bookings ran their course
    gone: list[str]  # booked, live, and no longer in the feed: cancelled
    actions: list[tuple[str, Action]]  # every occurrence read, soonest first


def compare(stored: Mapping[str, Span], wanted: Mapping[str, Span], now: datetime) -> Comparison:
    """Compare the occurrences booked before (`stored`) with those a read found (`wanted`), by
    booking id: a new one is booked, a moved one booked again, one no longer there cancelled."""
    live = {bid: span for bid, span in stored.items() if span[1] > now}
    actions: list[tuple[str, Action]] = []
    for bid in sorted(wanted, key=lambda bid: wanted[bid][0]):
        old = live.get(bid)
        actions.append((bid, "book" if old is None else "unchanged" if old == wanted[bid] else "rebook"))
    return Comparison(
        live,
        [bid for bid, span in stored.items() if span[1] <= now],
        [bid for bid in live if bid not in wanted],
        actions,
    )


def suspicious(live: int, gone: int, wanted: int, force: bool) -> bool:
    """Whether a read that drops `gone` of the `live` booked occurrences, finding `wanted`, is
    refused as a mass loss (`force`: the operator accepts it)."""
    return not force and gone > MASS_LOSS_MIN and gone * 2 > live and wanted * 2 < live


def next_poll(scheduled: datetime | None, now: datetime, interval: float, max_age: int | None) -> datetime:
    """When the feed is read next after a poll at `now`: one interval on, later when the source's
    Cache-Control max-age asks (at most MAX_AGE_CAP_SECONDS), never before what beat already set."""
    wait = interval if max_age is None else max(interval, min(max_age, MAX_AGE_CAP_SECONDS))
    return max(scheduled or now, now + timedelta(seconds=wait))
