"""The one start of a roomkeeper process: what every entry installs before it works.

Called by each process's entry (the Celery worker and beat through their init signals in
`worker.runtime.app`, the web app's factory, the CLI, the test suite, the benchmark); safe to call
again. Nothing here happens at import.
"""

from __future__ import annotations

import logging
import os
import threading

from worker.runtime import celery_fixes, resources
from worker.store import journal

_started = False
_lock = threading.Lock()


def _reset_after_fork() -> None:
    # Settings come from the environment the child inherited: keep them.
    resources.reset(settings=False)


def start() -> None:
    """Install the process-wide hooks, once per process (a forked child inherits them)."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
        os.register_at_fork(after_in_child=_reset_after_fork)
        celery_fixes.install()  # before any Celery event dispatcher flushes
        journal.install()  # history and outbox rows are written just before each commit
        logging.getLogger("httpx").setLevel(logging.WARNING)
