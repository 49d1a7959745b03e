"""What a feed's poll means (CONTRACT §5): whether a read is trusted, which event it sends, when
the feed is read next.

A poll's outcome is `ok`, `failed` (the read failed, or is not a complete calendar) or `suspicious`
(most of what was booked vanished at once). The feed tells its notify once when it enters a failed
or suspicious run, and once (`feed.recovered`) when an ok poll ends it; the polls in between send
nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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


def suspicious(live: int, gone: int, wanted: int, force: bool) -> bool:
    """Whether a read that drops `gone` of the `live` booked occurrences, finding `wanted`, is
    refused as a mass loss (`force`: the operator accepts it)."""
    return not force and gone > MASS_LOSS_MIN and gone * 2 > live and wanted * 2 < live


def next_poll(scheduled: datetime | None, now: datetime, interval: float, max_age: int | None) -> datetime:
    """When the feed is read next after a poll at `now`: one interval on, later when the source's
    Cache-Control max-age asks (at most MAX_AGE_CAP_SECONDS), never before what beat already set."""
    wait = interval if max_age is None else max(interval, min(max_age, MAX_AGE_CAP_SECONDS))
    return max(scheduled or now, now + timedelta(seconds=wait))
