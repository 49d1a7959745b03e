"""The event-buffer fix for Celery 5.6 (worker/runtime/celery_fixes.py): no task event lost to a flush."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Any

from celery.events.dispatcher import EventDispatcher

from worker.runtime import celery_fixes, process


class Dispatcher:
    """The parts of EventDispatcher that flush touches; publishing lets "another thread" append."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self._outbound_buffer: deque[tuple[Any, str, Exception | None]] = deque()
        self._group_buffer: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.producer = object()
        self.published: list[tuple[Any, str]] = []
        self.during_publish: list[dict[str, str]] = []
        self.fail_next = False

    def _publish(self, event: Any, producer: object, routing_key: str) -> None:
        # A pool thread sends its task-failed event while the loop's flush is publishing.
        while self.during_publish:
            self._group_buffer["task"].append(self.during_publish.pop())
        if self.fail_next:
            self.fail_next = False
            self._outbound_buffer.append((event, routing_key, RuntimeError("broker down")))
            return
        self.published.append((list(event) if isinstance(event, list) else event, routing_key))


def test_the_fix_is_installed_on_this_celery() -> None:
    process.start()  # every process's entry does (the worker and beat through their init signals)
    assert EventDispatcher.flush is celery_fixes._flush


def test_an_event_buffered_while_a_flush_publishes_is_kept_for_the_next_flush() -> None:
    dispatcher = Dispatcher()
    dispatcher._group_buffer["task"] = [{"type": "task-started"}]
    dispatcher.during_publish = [{"type": "task-failed"}]

    celery_fixes._flush(dispatcher)
    assert dispatcher.published == [([{"type": "task-started"}], "task.multi")]
    assert dispatcher._group_buffer["task"] == [{"type": "task-failed"}]  # Celery 5.6 cleared it

    celery_fixes._flush(dispatcher)
    assert dispatcher.published[-1] == ([{"type": "task-failed"}], "task.multi")
    assert dispatcher._group_buffer["task"] == []


def test_a_batch_whose_publish_failed_is_published_whole_by_the_next_flush() -> None:
    dispatcher = Dispatcher()
    dispatcher._group_buffer["task"] = [{"type": "task-succeeded"}, {"type": "task-failed"}]
    dispatcher.fail_next = True

    celery_fixes._flush(dispatcher)
    assert dispatcher.published == []

    celery_fixes._flush(dispatcher)
    assert dispatcher.published == [([{"type": "task-succeeded"}, {"type": "task-failed"}], "task.multi")]
    assert not dispatcher._outbound_buffer
