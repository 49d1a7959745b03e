"""The beat jobs: the due-work dispatcher, its recovery pass, the reconciler, and retention."""

from __future__ import annotations

from typing import Any

from worker.jobs import dispatch, occupancy, outbox, retention
from worker.jobs import reconcile as reconciler
from worker.runtime.app import app


@app.task(name="rooms.dispatch_due")
def dispatch_due() -> dict[str, Any]:
    counts: dict[str, Any] = dispatch.dispatch_due()
    counts["events_sent"] = outbox.flush_outbox()
    return counts


@app.task(name="rooms.recover_overdue")
def recover_overdue() -> dict[str, Any]:
    return dispatch.dispatch_due(overdue_only=True)


@app.task(name="rooms.reconcile")
def reconcile() -> dict[str, int]:
    return reconciler.reconcile()


@app.task(name="rooms.sweep_webhooks")
def sweep_webhooks() -> int:
    return occupancy.sweep()


@app.task(name="rooms.prune")
def prune() -> dict[str, int]:
    """Rows past retention removed, per table (worker/jobs/retention.py)."""
    return dict(retention.prune().removed)
