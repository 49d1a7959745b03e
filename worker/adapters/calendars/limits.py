"""The bounds of a feed, so one calendar cannot stall the service or flood it with bookings.

Shown by `roomkeeper feeds show` and `GET /v1/feeds/{name}` (`limits`) and in the README. Two more
come from the settings: ROOMKEEPER_FEED_MAX_COUNT (feeds kept) and
ROOMKEEPER_FEED_SYNC_DEADLINE_SECONDS (one sync's hard deadline).
"""

from __future__ import annotations

import time
from typing import Any

from config.settings import Settings

# A feed's body (downloaded, or a CalDAV calendar's events together) and the stored last good copy.
MAX_BODY_BYTES = 2 * 1024 * 1024
# A series that can make more occurrences a day than this (FREQ=MINUTELY or SECONDLY, or BYHOUR /
# BYMINUTE / BYSECOND lists that multiply to more) is skipped and reported, never expanded.
MAX_PER_DAY = 24
# Occurrences booked per series, and per feed, within the horizon: the soonest are kept, the rest
# skipped and reported.
MAX_PER_SERIES = 400
MAX_PER_FEED = 1000
# A series whose rule would step through more occurrences than this before the horizon (one with
# COUNT and BY... parts from long ago, which cannot be moved up to the horizon) is skipped.
MAX_STEPS_BEFORE = 20_000


class DeadlinePassed(RuntimeError):
    """The sync ran past its deadline; nothing was changed."""


class Deadline:
    """An instant on the monotonic clock that a sync checks between its units of work."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, doing: str) -> None:
        if time.monotonic() > self.at:
            raise DeadlinePassed(
                f"the sync passed its {self.seconds:g} s deadline while {doing}; nothing was changed"
            )


def describe(settings: Settings) -> dict[str, Any]:
    """The bounds as `feeds show` prints them."""
    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "finest_frequency": f"at most {MAX_PER_DAY} occurrences a day (MINUTELY and SECONDLY are skipped)",
        "max_occurrences_per_series": MAX_PER_SERIES,
        "max_occurrences_per_feed": MAX_PER_FEED,
        "max_feeds": settings.feed_max_count,
        "sync_deadline_seconds": settings.feed_sync_deadline_seconds,
    }
