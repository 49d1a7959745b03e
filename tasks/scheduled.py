"""The beat jobs: the due-work dispatcher and the reconciler."""

from __future__ import annotations

from typing import Any

from worker import service
from worker.app import app


@app.task(name="rooms.dispatch_due")
def dispatch_due() -> dict[str, Any]:
    counts: dict[str, Any] = service.dispatch_due()
    counts["events_sent"] = service.flush_outbox()
    return counts


@app.task(name="rooms.recover_overdue")
def recover_overdue() -> dict[str, Any]:
    return service.dispatch_due(overdue_only=True)


@app.task(name="rooms.reconcile")
def reconcile() -> dict[str, int]:
    return service.reconcile()
