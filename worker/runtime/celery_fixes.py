"""Fixes to Celery 5.6 that this project needs until it can move to 5.7 (see pyproject.toml).

`EventDispatcher.flush` loses task events with the `threads` pool, our default: the worker
buffers task events, a pool thread appends to the buffer while the event loop flushes it, and the
flush then clears the list it just published, dropping what was appended meanwhile (celery#10434,
fixed upstream by #10435; #10401 and #10417 fix the same loss when a publish fails). Flower then
shows a failed task as STARTED forever. This flush takes out exactly what it publishes.
"""

from __future__ import annotations

from typing import Any

import celery
from celery.events.dispatcher import EventDispatcher


def _flush(self: Any, errors: bool = True, groups: bool = True) -> None:
    """Flush the outbound buffer; events buffered while it runs wait for the next flush."""
    if errors:
        with self.mutex:
            pending = []
            while self._outbound_buffer:
                pending.append(self._outbound_buffer.popleft())
            for event, routing_key, _ in pending:
                self._publish(event, self.producer, routing_key)  # re-buffers itself on failure
    if groups:
        with self.mutex:
            for group, events in self._group_buffer.items():
                batch = events[:]
                del events[: len(batch)]  # appends made since the copy stay in the buffer
                if batch:
                    self._publish(batch, self.producer, f"{group}.multi")


def install() -> None:
    if tuple(int(part) for part in celery.__version__.split(".")[:2]) < (5, 7):
        EventDispatcher.flush = _flush
