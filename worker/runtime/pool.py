"""The worker's threads pool: Celery's, with a queue that puts room creations last.

At the top of the hour a worker holds thousands of messages that fall due at once. Celery's threads
pool starts them in the order they became ready, so a deletion due a second after ten thousand
creations waited behind all of them. Here every other task (deletions, callers' requests, events)
goes ahead of creations: a room that must go outranks one that may be made a moment later. Within
each rank the order is the order they became ready, which for ETA messages is their due order.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from celery.concurrency import thread
from celery.concurrency.base import BasePool, apply_target

# The tasks that may wait behind everything else.
LAST = frozenset({"rooms.create_room"})
FIRST_RANK, LAST_RANK, STOP_RANK = 0, 1, 2
# (rank, arrival, future, function, arguments): arrivals are unique, so futures are never compared.
Item = tuple[int, int, "Future[Any] | None", Callable[..., Any], tuple[Any, ...]]


class RankedExecutor:
    """A fixed set of threads taking work by (rank, arrival): a ThreadPoolExecutor whose queue is
    ordered. `shutdown` lets the work already queued finish, as ThreadPoolExecutor's does."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.PriorityQueue[Item] = queue.PriorityQueue()
        self._arrival = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"roomkeeper-pool-{n}", daemon=True)
            for n in range(threads)
        ]
        for worker in self._threads:
            worker.start()

    def submit(self, rank: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((rank, next(self._arrival), future, fn, args))
        return future

    def pending(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to whoever waits on the future, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put((STOP_RANK, next(self._arrival), None, _stop, ()))
        for worker in self._threads:
            worker.join()


def _stop() -> None:
    """The marker a pool thread stops at (never called)."""


class TaskPool(thread.TaskPool):
    """`celery.concurrency.thread.TaskPool` with the ranked queue (`-P worker.runtime.pool:TaskPool`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        BasePool.__init__(self, *args, **kwargs)
        self.executor = RankedExecutor(self.limit)

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> thread.ApplyResult:
        # Celery hands the pool (task name, id, request, body, …): the name sets the rank.
        rank = LAST_RANK if args and args[0] in LAST else FIRST_RANK
        executor: RankedExecutor = self.executor
        return thread.ApplyResult(
            executor.submit(rank, apply_target, target, args, kwargs, callback, accept_callback)
        )

    def _get_info(self) -> Any:
        info = BasePool._get_info(self)
        executor: RankedExecutor = self.executor
        info.update({"max-concurrency": self.limit, "threads": self.limit, "waiting": executor.pending()})
        return info
