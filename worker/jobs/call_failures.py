"""What a failed Whereby call does beyond the store: pausing every worker, and failing the task."""

from __future__ import annotations

from worker.adapters import whereby
from worker.adapters.budget import BudgetExhausted, get_budget
from worker.rules import lifecycle


class WherebyCallFailed(RuntimeError):
    """Raised by a room task whose Whereby call failed, after the store has recorded what happens
    next (a retry at its instant, or the meeting failed): the task then shows as FAILURE, with its
    booking and reason, in Flower and its Failed filter. No worker slot sleeps on a backoff."""

    @classmethod
    def from_error(cls, error: whereby.WherebyError, booking_id: str, outcome: str) -> WherebyCallFailed:
        if isinstance(error, whereby.AuthenticationError):
            return WherebyKeyRejected(
                f"booking {booking_id}: Whereby rejected the API key (401): set a valid WHEREBY_API_KEY; "
                f"Whereby calls pause {lifecycle.AUTH_PAUSE_SECONDS}s at a time until it is fixed"
            )
        return cls(f"booking {booking_id}: {outcome.removeprefix('failed: ')}")


class WherebyKeyRejected(WherebyCallFailed):
    """Whereby answered 401: the operator must fix the key."""


def heed_rate_limit(error: Exception) -> None:
    """A 429 from Whereby (not our own limiter) or a 401 pauses every worker's calls."""
    if isinstance(error, whereby.RateLimitedError) and not isinstance(error, BudgetExhausted):
        get_budget().pause(error.retry_after)
    elif isinstance(error, whereby.AuthenticationError):
        get_budget().pause(lifecycle.AUTH_PAUSE_SECONDS, "Whereby rejected the API key (401)")
