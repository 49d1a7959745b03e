"""Secrets the service itself must never write: Whereby host room keys in log lines.

A host `roomKey` gives host rights in a room and cannot be revoked short of deleting the room, so
it ranks with the API key. The meeting view carries it (`host_room_url`), and Celery logs a
task's result at INFO: this filter, on every handler of the worker, beat, web and CLI processes,
writes `roomKey=[redacted]` instead.
"""

from __future__ import annotations

import logging
import re

ROOM_KEY = re.compile(r"(roomKey=)[^&\s'\"]+")
REDACTED = r"\1[redacted]"


def redact(text: str) -> str:
    return ROOM_KEY.sub(REDACTED, text)


class RedactRoomKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "roomKey=" in message:
            record.msg, record.args = redact(message), None
        if record.exc_text and "roomKey=" in record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactRoomKeys) for f in handler.filters):
            handler.addFilter(RedactRoomKeys())
