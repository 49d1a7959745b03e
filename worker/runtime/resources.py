"""Per-process state in one place: the Whereby client and the registry of everything else to reset.

Each module that keeps per-process state (engines, the budget, the claim renewer, the outbox flush,
the deployment identity) registers its reset here with `on_reset`. `reset()` is the one reset: a
forked child runs it (its parent's connections, threads and locks are not its own), and so do the
tests and the benchmark when they change the settings.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from config.settings import get_settings, reset_settings
from worker import store
from worker.adapters import budget, whereby
from worker.adapters.budget import before_request

_resets: dict[str, Callable[[], None]] = {}


def on_reset(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a piece of per-process state's reset (once per name: re-imports replace it)."""

    def register(reset_fn: Callable[[], None]) -> Callable[[], None]:
        _resets[name] = reset_fn
        return reset_fn

    return register


def reset(*, settings: bool = True) -> None:
    """Forget every piece of per-process state; the next use builds it afresh from the settings."""
    if settings:
        reset_settings()
    for reset_fn in list(_resets.values()):
        reset_fn()


# The two leaves that cannot import this module (it imports them) are registered here.
on_reset("database engines")(store.dispose_engines)
on_reset("point budget")(budget.reset_budget)


def _reset_after_fork() -> None:
    # Settings come from the environment the child inherited: keep them.
    reset(settings=False)


os.register_at_fork(after_in_child=_reset_after_fork)


# --------------------------------------------------------------------------------------------
# The Whereby client: one per process, its calls recorded into the running task's history.

_client: whereby.WherebyClient | None = None
_client_lock = threading.Lock()
_calls: ContextVar[list[whereby.CallRecord] | None] = ContextVar("whereby_calls", default=None)


def _record_call(record: whereby.CallRecord) -> None:
    calls = _calls.get()
    if calls is not None:
        calls.append(record)


def client() -> whereby.WherebyClient:
    global _client
    with _client_lock:
        if _client is None:
            settings = get_settings()
            _client = whereby.WherebyClient(
                settings.whereby_api_url,
                settings.api_key,
                timeout=settings.whereby_timeout_seconds,
                before_request=before_request,
                on_call=_record_call,
            )
        return _client


@on_reset("whereby client")
def _reset_client() -> None:
    global _client, _client_lock
    # Dropped, not closed: a thread may still be mid-call on it (tests reset between cases), and a
    # forked child must not shut connections its parent still uses. Garbage collection closes it.
    _client = None
    _client_lock = threading.Lock()  # a forked child may have copied it held


@contextmanager
def recording_calls() -> Iterator[list[whereby.CallRecord]]:
    """Gather the Whereby calls made inside the block (this thread's), for the history."""
    calls: list[whereby.CallRecord] = []
    token = _calls.set(calls)
    try:
        yield calls
    finally:
        _calls.reset(token)
