"""Backoff between attempts, one rule for every retry the store schedules (room work, deliveries)."""

from __future__ import annotations

# 2.0**1100 overflows: the exponent is bounded first, as deletions retry without end.
_MAX_EXPONENT = 60


def backoff(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Seconds to wait after the `attempt`-th failure: `base` doubling each attempt, capped at `cap`,
    and spread over [½, 1] of that by `jitter` (a draw in [0, 1] the caller makes), so that workers
    that failed together do not come back together."""
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), _MAX_EXPONENT))
    return ceiling / 2 + ceiling / 2 * jitter
