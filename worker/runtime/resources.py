"""The one owner of per-process state: engines, Redis and HTTP clients, the renewer, executors.

A module that needs a per-process thing asks for it by name, `own(name, make, close)`, where it
uses it; nothing registers at import. `reset()` is the one reset: it drops everything owned (closing
what has a `close`), so the next use builds it afresh from the settings. A forked child runs it (its
parent's connections, threads and locks are not its own: see `worker.runtime.process.start`), and
so do the tests and the benchmark when they change the settings.

This module imports nothing of the project but the settings, so every layer may use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from config.settings import reset_settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Resources:
    """What one process holds, by name, in the order it was built."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Any, Callable[[Any], None] | None]] = {}
        self._lock = threading.Lock()
        # One lock per name, held while it is made: making one thing may take time or ask for
        # another (the identity reads the store through an engine), and must not stop the rest.
        self._making: dict[str, threading.Lock] = {}

    def own(self, name: str, make: Callable[[], T], close: Callable[[T], None] | None = None) -> T:
        held = self._held.get(name)
        if held is None:
            with self._lock:
                making = self._making.setdefault(name, threading.Lock())
            with making:
                held = self._held.get(name)
                if held is None:
                    held = (make(), close)
                    with self._lock:
                        self._held[name] = held
        value: T = held[0]
        return value

    def drop(self, *names: str) -> None:
        """Forget these (not closed): their next use builds them afresh."""
        with self._lock:
            for name in names:
                self._held.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def close(self) -> None:
        # Not under the lock: a forked child may have copied it held by a thread it does not have.
        held = list(self._held.items())
        self._held.clear()
        for name, (value, close) in reversed(held):
            if close is not None:
                try:
                    close(value)
                except Exception:  # one that will not close must not keep the others open
                    log.exception("closing %s failed", name)


_current = Resources()


def own(name: str, make: Callable[[], T], close: Callable[[T], None] | None = None) -> T:
    """This process's `name`, made by `make` on first use; `close` runs when it is reset."""
    return _current.own(name, make, close)


def drop(*names: str) -> None:
    """Forget these pieces only (a test changing one setting); `reset` forgets everything."""
    _current.drop(*names)


def current() -> Resources:
    return _current


def reset(*, settings: bool = True) -> None:
    """Forget every piece of per-process state; the next use builds it afresh from the settings."""
    global _current
    # Swapped, not emptied under its lock: a forked child may have copied that lock held.
    old, _current = _current, Resources()
    if settings:
        reset_settings()
    old.close()
