"""Events POSTed to callers' notify URLs (CONTRACT §4.4): one booking's chain, and beat's sweep."""

from __future__ import annotations

from worker.jobs import delivery, delivery_chain
from worker.runtime.app import app


# Its own time limits, not ROOMKEEPER_TASK_TIME_LIMIT_SECONDS (sized for Whereby calls): a run
# stops taking new attempts after delivery.RUN_SECONDS, and one attempt is bounded by its timeouts.
@app.task(name="rooms.deliver_events", ignore_result=True, soft_time_limit=55, time_limit=60)
def deliver_events(booking_id: str, claim: str | None = None) -> dict[str, int]:
    return delivery.deliver(booking_id, claim)


@app.task(name="rooms.dispatch_deliveries")
def dispatch_deliveries() -> int:
    return delivery_chain.dispatch_due()
