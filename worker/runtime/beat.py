"""Beat's scheduler: the ticks that usually find nothing to do run inside beat, not as Celery tasks.

The dispatcher ticks every few seconds and nearly always finds nothing due. Sent as tasks, those
ticks filled Flower's task list and pushed every booking's tasks out of it. Entries whose options
say `run_in_beat` are therefore run here, in a thread of beat's own process, by calling the
registered task object (whatever its body calls); only the real work they find (room tasks with
ETAs, events) reaches the broker. Other entries are sent as usual.

Each in-process entry runs in a background thread, one run at a time per entry, so a slow pass
never holds up beat's loop or the other entries; a tick that finds the previous run still going is
skipped (and logged), and an exception is logged and the next tick runs the entry again.

Beat does not fork, so the store's engines and the Redis budget it now uses are its own; were it
ever forked (`--detach`, `worker -B`), `worker.runtime.resources` resets them in the child.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.beat import ScheduleEntry, Scheduler

from config.celery import RUN_AT_START, RUN_IN_BEAT

log = logging.getLogger(__name__)

# How long a warm shutdown waits for the passes still running, well inside the usual 10 s stop grace.
# They are safe to cut short: their claims lapse after a lease and the next beat sends the work again.
SHUTDOWN_WAIT_SECONDS = 5.0


class _Run:
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.started = time.monotonic()


class InBeatScheduler(Scheduler):
    """`celery.beat.Scheduler` (no schedule file) that runs `run_in_beat` entries in-process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runs: dict[str, _Run] = {}
        self._started = False
        super().__init__(*args, **kwargs)

    @staticmethod
    def runs_in_beat(entry: ScheduleEntry) -> bool:
        return bool((entry.options or {}).get(RUN_IN_BEAT))

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._started:
            # Work that fell due while beat was down goes out now, not one interval after start.
            self._started = True
            for entry in list(self.schedule.values()):
                if self.runs_in_beat(entry) and entry.options.get(RUN_AT_START):
                    self.run_in_beat(entry)
        interval: float = super().tick(*args, **kwargs)
        return interval

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        if self.runs_in_beat(entry):
            self.run_in_beat(entry)
        else:
            super().apply_entry(entry, producer=producer)

    def run_in_beat(self, entry: ScheduleEntry) -> threading.Thread | None:
        """Start one run of the entry's task in a thread; None when its previous run still goes."""
        previous = self._runs.get(entry.name)
        if previous is not None and previous.thread.is_alive():
            log.warning(
                "beat: %s (%s) skipped this tick: its previous run is still going after %.1f s",
                entry.name,
                entry.task,
                time.monotonic() - previous.started,
            )
            return None
        thread = threading.Thread(
            target=self._run,
            args=(entry.name, entry.task, tuple(entry.args or ()), dict(entry.kwargs or {})),
            name=f"beat-{entry.name}",
            daemon=True,
        )
        self._runs[entry.name] = _Run(thread)
        thread.start()
        return thread

    def _run(self, name: str, task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        log.debug("beat: running %s (%s) in-process", name, task_name)
        try:
            # Calling the task object runs its body here, as a direct call: no message, no event.
            result = self.app.tasks[task_name](*args, **kwargs)
        except Exception:
            log.exception("beat: %s (%s) failed; its next tick runs it again", name, task_name)
        else:
            log.debug("beat: %s (%s) done: %r", name, task_name, result)

    def close(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_WAIT_SECONDS
        for run in list(self._runs.values()):
            run.thread.join(max(0.0, deadline - time.monotonic()))
        super().close()

    @property
    def info(self) -> str:
        names = sorted(entry.task for entry in self.schedule.values() if self.runs_in_beat(entry))
        return f"in-process: {', '.join(names)}" if names else ""
