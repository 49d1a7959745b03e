"""Secrets the service itself must never write: Whereby host room keys in log lines.

A host `roomKey` gives host rights in a room and cannot be revoked short of deleting the room, so
it ranks with the API key. The meeting view carries it (`host_room_url`), and Celery logs a
task's result at INFO: this filter, on every handler of the worker, beat, web and CLI processes,
writes `roomKey=[redacted]` instead.
"""

from __future__ import annotations

import logging
import re

# `roomKey=`, also percent-encoded once or twice (a room URL inside another URL's query).
ROOM_KEY = re.compile(r"(roomkey(?:=|%3d|%253d))[^&\s'\"]+", re.IGNORECASE)
REDACTED = r"\1[redacted]"

_TRACEBACKS = logging.Formatter()


def redact(text: str) -> str:
    return ROOM_KEY.sub(REDACTED, text)


class RedactRoomKeys(logging.Filter):
    """Redacts the message, its traceback and its stack before the handler formats the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: the handler reports it, as without this filter
        if ROOM_KEY.search(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            # Formatted here, once, so the traceback (whose last line is the error's message) is
            # redacted too; formatters use exc_text when it is set.
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactRoomKeys) for f in handler.filters):
            handler.addFilter(RedactRoomKeys())
