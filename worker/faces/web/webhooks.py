"""`POST /whereby/webhooks`: Whereby's webhooks, verified, stored, and left to a worker (CONTRACT §4.3).

The answer must come within Whereby's 5 s: this route only checks the signature on the raw body,
stores the event (a repeated delivery is recognised by its id) and sends the room's apply task.
Should the broker be down, beat's sweep applies the stored event a moment later.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from config.settings import get_settings
from worker.faces.web import bodies
from worker.faces.web.problems import MEDIA_TYPE, Problem, Refused
from worker.jobs import occupancy
from worker.runtime.app import app
from worker.store.models import utcnow

log = logging.getLogger(__name__)
router = APIRouter(tags=["whereby"])

# Whereby's envelopes are a few hundred bytes; anything far larger is not one of them.
MAX_BODY = 64 * 1024


def _send(whereby_id: str) -> None:
    try:
        app.send_task("rooms.apply_webhooks", kwargs={"whereby_id": whereby_id}, queue=get_settings().queue)
    except Exception:  # stored already: beat's sweep applies it
        log.warning("could not queue the webhooks of room %s; beat's sweep will apply them", whereby_id)


def _receive(event: occupancy.Event) -> bool:
    stored = occupancy.store(event, utcnow())
    if stored and event.whereby_id is not None:
        _send(event.whereby_id)
    return stored


class WebhookReceived(BaseModel):
    received: str = Field(description="the event's id")
    duplicate: bool = Field(description="true: this event had been received already (nothing changed)")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": text}
    for status, text in (
        (400, "a signed body that is not a Whereby webhook"),
        (401, "signature missing, wrong or too old: nothing changed"),
        (404, "webhooks are not configured (ROOMKEEPER_WHEREBY_WEBHOOK_SECRET unset)"),
        (413, "body too large"),
    )
}


@router.post(
    "/whereby/webhooks",
    summary="Receive Whereby's webhooks (room.client.joined / left, room.session.started / ended)",
    responses=_ERRORS,
)
async def whereby_webhook(request: Request) -> WebhookReceived:
    # occupancy's BadSignature (401) and BadEvent (400) are answered by problems.install.
    secret = get_settings().whereby_webhook_secret
    if secret is None:
        raise Refused(404, "Not Found", "webhooks are not configured here")
    header = request.headers.get("Whereby-Signature")
    # The header's shape first: a caller without one is refused before any byte is read.
    occupancy.signature_fields(header)
    raw = await bodies.read(request, MAX_BODY)
    occupancy.verify(raw, header, secret.get_secret_value(), utcnow())
    event = occupancy.parse(raw)
    stored = await run_in_threadpool(_receive, event)
    return WebhookReceived(received=event.id, duplicate=not stored)
