"""The /v1 route: hands each Whereby API call to the app's Sandbox and sends back its Reply."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.devtools.sandbox.state import Sandbox
from worker.devtools.sandbox.wire import Reply


def sandbox_of(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox


def _response(reply: Reply) -> Response:
    if reply.body is None:
        return Response(status_code=reply.status, headers=reply.headers)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def _v1(request: Request) -> Response:
    sandbox = sandbox_of(request)
    # asyncio.sleep, not time.sleep: slow answers must not stop the server answering others.
    if sandbox.config.latency_ms > 0:
        await asyncio.sleep(sandbox.config.latency_ms / 1000)
    reply = sandbox.handle(
        request.method,
        request.url.path,
        request.query_params.multi_items(),
        request.headers.get("authorization"),
        await request.body(),
    )
    if reply.stall > 0:
        await asyncio.sleep(reply.stall)
    return _response(reply)


ROUTES = [
    Route(
        "/v1/{rest:path}",
        _v1,
        methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
    ),
]
