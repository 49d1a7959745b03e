"""The organisation's point budget: a sliding one-minute window of spent points, and the 429 it earns."""

from __future__ import annotations

import email.utils
import math
from collections import deque

from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.wire import Reply

# Whereby's documented price list: read 1, delete 2, write 3.
POINTS = {"GET": 1, "DELETE": 2, "POST": 3}
WINDOW_SECONDS = 60.0
THROTTLE_MESSAGE = "Rate limit active for throttle key: organization:1"
# An unlimited sandbox has no budget to report; clients still parse the header, so give them the
# Build plan's figure rather than a 0 that reads as "no budget at all".
NOMINAL_LIMIT = 100


class PointsWindow:
    """Points spent in the last minute against ``config.points_per_minute`` (0 means unlimited).

    Not locked: the Sandbox that owns it calls it under its own lock.
    """

    def __init__(self, config: SandboxConfig):
        self.config = config
        self._spent: deque[tuple[float, int]] = deque()

    def charge(self, now: float, points: int) -> None:
        self._spent.append((now, points))

    def clear(self) -> None:
        self._spent.clear()

    def used(self, now: float) -> int:
        while self._spent and self._spent[0][0] <= now - WINDOW_SECONDS:
            self._spent.popleft()
        return sum(points for _, points in self._spent)

    def throttle(self, now: float, cost: int) -> Reply | None:
        """The 429 for a call costing ``cost`` now, or None when it fits the budget."""
        limit = self.config.points_per_minute
        used = self.used(now)
        if limit <= 0 or used + cost <= limit:
            return None
        # A call dearer than the whole budget never fits; tell the client to wait a full window.
        wait = WINDOW_SECONDS
        if cost <= limit:
            need, freed = used + cost - limit, 0
            for at, points in self._spent:
                freed += points
                if freed >= need:
                    wait = at + WINDOW_SECONDS - now
                    break
        return self.too_many(now, wait, remaining=max(0, limit - used))

    def too_many(self, now: float, wait: float, remaining: int) -> Reply:
        limit = self.config.points_per_minute or NOMINAL_LIMIT
        return Reply(
            429,
            {"error": THROTTLE_MESSAGE, "data": {"msLeft": math.ceil(wait * 1000)}},
            {
                "Retry-After": str(max(1, math.ceil(wait))),
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": email.utils.formatdate(math.ceil(now + wait), usegmt=True),
            },
        )

    def with_budget(self, now: float, reply: Reply) -> Reply:
        """Adds the X-RateLimit headers to an admitted call's reply when there is a budget."""
        limit = self.config.points_per_minute
        if limit > 0:
            reply.headers["X-RateLimit-Limit"] = str(limit)
            reply.headers["X-RateLimit-Remaining"] = str(max(0, limit - self.used(now)))
        return reply
