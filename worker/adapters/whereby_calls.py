"""The process's Whereby client, metered by the shared point budget, and the calls a task made.

Jobs call Whereby through `client()`, inside `recording_calls()` so the calls land in the booking's
history. The client is owned by `worker.runtime.resources` (one per process, dropped on reset).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from config.settings import get_settings
from worker.adapters import whereby
from worker.adapters.budget import before_request
from worker.runtime import resources

_calls: ContextVar[list[whereby.CallRecord] | None] = ContextVar("whereby_calls", default=None)


def _record_call(record: whereby.CallRecord) -> None:
    calls = _calls.get()
    if calls is not None:
        calls.append(record)


def _make_client() -> whereby.WherebyClient:
    settings = get_settings()
    return whereby.WherebyClient(
        settings.whereby_api_url,
        settings.api_key,
        timeout=settings.whereby_timeout_seconds,
        before_request=before_request,
        on_call=_record_call,
    )


def client() -> whereby.WherebyClient:
    # Dropped, not closed, on reset: a thread may still be mid-call on it (tests reset between
    # cases), and a forked child must not shut connections its parent still uses.
    return resources.own("whereby client", _make_client)


@contextmanager
def recording_calls() -> Iterator[list[whereby.CallRecord]]:
    """Gather the Whereby calls made inside the block (this thread's), for the history."""
    calls: list[whereby.CallRecord] = []
    token = _calls.set(calls)
    try:
        yield calls
    finally:
        _calls.reset(token)
