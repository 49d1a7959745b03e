"""Many bookings at once (CONTRACT §4.2 `POST /v1/bookings/batch`, task `rooms.schedule_meetings`).

Every item is validated on its own by the model that validates one booking (`ScheduleRequest`), so
a bad item gets its own errors and never blocks the good ones. The good ones are stored by the
path that stores a single booking (`worker/jobs/booking.py` `store`), in one transaction per chunk
of CHUNK items: new booking ids in one multi-row INSERT (and their history in one more, see
`worker/store/journal.py`); ids already stored go through the reschedule rule one by one inside the
same transaction. The work that falls due at once is dispatched once, after the whole batch has
committed.

A booking id that appears more than once in one batch is stored from its first item; every later
item with that id is refused (`booking_id: appears more than once in this batch`), so the answer
never depends on which of two contradicting items "won".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config.settings import get_settings
from worker.adapters import outbound
from worker.jobs import booking
from worker.rules.validation import ScheduleRequest, problems
from worker.store.models import utcnow
from worker.store.persist import AfterCommit

log = logging.getLogger(__name__)

MAX_ITEMS = 1000
# Items stored per transaction: large enough that a batch costs a handful of commits, small enough
# that one transaction never holds SQLite's single write lock for long.
CHUNK = 200


class ScheduleBatch(BaseModel):
    """The batch itself: `bookings`, a list of up to MAX_ITEMS items, each checked on its own."""

    model_config = ConfigDict(extra="forbid")

    bookings: Annotated[list[Any], Field(max_length=MAX_ITEMS)]


_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.DOTALL)


def named_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """`worker.rules.validation.problems`, with the field of a rule that names it in its message
    (`end: must be after start`) moved into `field`, as callers of the HTTP face read it."""
    named = []
    for field, rule in problems(exc):
        if not field and (found := _FIELD.match(rule)):
            field, rule = found.group(1), found.group(2)
        named.append((field, rule))
    return named


def failure(errors: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"ok": False, "errors": [{"field": field, "rule": rule} for field, rule in errors]}


def success(meeting_view: dict[str, Any], created: bool) -> dict[str, Any]:
    return {"ok": True, "created": created, "view": meeting_view}


def _parse(item: Any, context: dict[str, Any]) -> ScheduleRequest | list[tuple[str, str]]:
    if not isinstance(item, dict):
        return [("", "each booking must be a JSON object")]
    try:
        return ScheduleRequest.model_validate(item, context=context)
    except ValidationError as exc:
        return named_problems(exc)


def schedule_many(items: Sequence[Any], *, over_http: bool = False) -> list[dict[str, Any]]:
    """One result per item, in order: `{"ok": true, "created": bool, "view": VIEW}` or
    `{"ok": false, "errors": [{"field", "rule"}, ...]}` (fields named within the item).
    `over_http`: the items came over HTTP, where a notify task must be one the operator lists."""
    settings = get_settings()
    context = {
        "caller_prefix_max": settings.caller_prefix_max,
        "over_http": over_http,
        "settings": settings,
        "now": utcnow(),
        "check_url": outbound.check_url,
    }
    results: list[dict[str, Any] | None] = [None] * len(items)
    valid: list[tuple[int, ScheduleRequest]] = []
    first_at: dict[str, int] = {}
    for index, item in enumerate(items):
        parsed = _parse(item, context)
        if isinstance(parsed, list):
            results[index] = failure(parsed)
            continue
        first = first_at.setdefault(parsed.booking_id, index)
        if first != index:
            results[index] = failure(
                [("booking_id", f"appears more than once in this batch (first as item {first})")]
            )
            continue
        valid.append((index, parsed))
    after = AfterCommit()
    try:
        for chunk in _chunks(valid, CHUNK):
            stored = booking.store([request for _, request in chunk], after)
            for (index, _), (meeting_view, created) in zip(chunk, stored, strict=True):
                results[index] = success(meeting_view, created)
    finally:
        # Should a chunk fail, the ones committed before it are stored: their due work goes now
        # (beat's dispatcher would find it anyway, up to an interval later).
        after.run()
    done = [r for r in results if r is not None]
    assert len(done) == len(items)
    log.info("batch of %d: %d stored, %d refused", len(items), len(valid), len(items) - len(valid))
    return done


def _chunks(
    items: list[tuple[int, ScheduleRequest]], size: int
) -> Iterator[list[tuple[int, ScheduleRequest]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
