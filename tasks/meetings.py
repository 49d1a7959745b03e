"""The tasks other applications send by name (CONTRACT §2): schedule, cancel and read a meeting.

A caller's mistake fails the task with InvalidRequest, whose one argument is its text
(`field: rule; field: rule`, §2.6): that text is all Celery hands the caller. It is named in
`throws`: an expected outcome, logged without a traceback.
"""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from worker.adapters import outbound
from worker.jobs import batch, booking
from worker.rules.validation import BookingRef, InvalidRequest, ScheduleRequest, validate
from worker.runtime.app import app
from worker.store.models import utcnow


@app.task(name="rooms.schedule_meeting", typing=False, throws=(InvalidRequest,))
def schedule_meeting(*args: Any, **kwargs: Any) -> dict[str, Any]:
    settings = get_settings()
    request = validate(
        ScheduleRequest,
        args,
        kwargs,
        caller_prefix_max=settings.caller_prefix_max,
        settings=settings,
        now=utcnow(),
        check_url=outbound.check_url,
    )
    return booking.schedule_meeting(request)


@app.task(name="rooms.cancel_meeting", typing=False, throws=(InvalidRequest,))
def cancel_meeting(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return booking.cancel_meeting(validate(BookingRef, args, kwargs).booking_id)


@app.task(name="rooms.get_meeting", typing=False, throws=(InvalidRequest,))
def get_meeting(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return booking.get_meeting(validate(BookingRef, args, kwargs).booking_id)


@app.task(name="rooms.schedule_meetings", typing=False, throws=(InvalidRequest,))
def schedule_meetings(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Up to 1,000 bookings at once: one result per item, in order (worker/jobs/batch.py)."""
    return batch.schedule_many(validate(batch.ScheduleBatch, args, kwargs).bookings)
