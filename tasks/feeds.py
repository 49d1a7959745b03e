"""Calendar feeds (CONTRACT §5): beat's poll, run in beat, sends one `feeds.sync` per feed due."""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from worker.jobs.feeds import registry, sync
from worker.runtime.app import app


@app.task(name="feeds.poll_due")
def poll_due() -> list[str]:
    queue = get_settings().queue
    return sync.poll_due(lambda name: app.send_task("feeds.sync", kwargs={"name": name}, queue=queue))


@app.task(name="feeds.sync")
def sync_feed(name: str) -> dict[str, Any]:
    try:
        return sync.sync_feed(name)
    except registry.UnknownFeed:
        return {"name": name, "last_outcome": "removed"}
