"""The `web` process's ASGI app: health and metrics, Whereby's webhooks, bookings, feeds (CONTRACT §4).

Each router lives in its own module; this file only puts them together. Stateless: run as many as
you like behind a proxy.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from worker.faces.web import problems


def create_app() -> FastAPI:
    # Imported here so that `worker.faces.web` can be imported without pulling every router in.
    from worker.faces.web import bookings, docs, feeds, health, webhooks
    from worker.runtime import process

    process.start()  # once per process: this factory is the web process's entry
    health.install()  # probes stay out of the access log

    app = FastAPI(
        title="roomkeeper",
        version="1",
        summary="Whereby rooms for bookings: created ahead of each meeting, deleted when it is over.",
        docs_url=None,  # served by worker/faces/web/docs.py from local files, not a CDN
        redoc_url=None,
        # Named, not left to FastAPI's default, which writes a response model with pydantic's own
        # JSON writer: that one writes some numbers of a caller's metadata otherwise than the json
        # module always has (1e-7 for 1e-07). Named, the answer is the model's, by json.dumps.
        default_response_class=JSONResponse,
    )
    problems.install(app)
    docs.install(app)
    app.include_router(health.router)
    app.include_router(webhooks.router)
    app.include_router(bookings.router)
    app.include_router(feeds.router)
    return app
