"""`/healthz`, `/readyz`, `/metrics` (CONTRACT §4.1): is the process up, can it serve, how is the service.

`/healthz` answers while the process serves (a liveness probe). `/readyz` asks the database and
Redis, each in a thread of its own with a deadline, and names whichever did not answer (a
readiness probe, or a load balancer's check). `/metrics` is Prometheus's text format, built at
each scrape from the store and the workers' counters in Redis (worker/adapters/metrics.py), so every `web`
process exports the same figures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from worker.adapters import metrics, metrics_export
from worker.faces.web.problems import MEDIA_TYPE, Problem, problem
from worker.runtime import resources

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


class QuietProbes(logging.Filter):
    """Drops uvicorn's access line of each successful probe and scrape (one every few seconds,
    from every load balancer and Prometheus); failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:  # client, method, path, http version, status
            _client, method, path, _version, status = args
            return not (method == "GET" and path in PROBES and isinstance(status, int) and status < 400)
        return True


def install() -> None:
    """Keep the probes out of uvicorn's access log (called by the app's factory, worker/faces/web/app.py)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietProbes) for f in access.filters):
        access.addFilter(QuietProbes())


class _Readiness:
    """The checks block on sockets: they run on threads of their own, so a hung database cannot
    take the threads the routes run on. Their sockets time out soon after the deadline, so these
    few threads come back. `ready` remembers the last answer, to log only its changes."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")
        self.ready = True


def _readiness() -> _Readiness:
    # Dropped, not shut down, on reset: its idle threads end once it is collected.
    return resources.own("readiness checks", _Readiness)


def _pool() -> ThreadPoolExecutor:
    return _readiness().executor


async def _check(name: str, check: Callable[[], None]) -> str | None:
    """None when the check passed within the deadline, else why not: the error's text goes to the
    log only (it may name hosts, users or schemas); the answer says which dependency is down."""
    future = asyncio.get_running_loop().run_in_executor(_pool(), check)
    try:
        await asyncio.wait_for(future, timeout=metrics.TIMEOUT_SECONDS)
    except TimeoutError:
        return f"{name}: no answer within {metrics.TIMEOUT_SECONDS:g} s"
    except Exception as error:
        log.warning("readiness: %s: %s", name, metrics.describe(error))
        return f"{name}: not answering (the reason is in the web process's log)"
    return None


class Healthy(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str = "ok"
    checks: dict[str, str]  # each source checked, "ok"


@router.get("/healthz", summary="Liveness: 200 while the process serves")
async def healthz() -> Healthy:
    return Healthy()


@router.get(
    "/readyz",
    summary="Readiness: 200 when the database and Redis answer, 503 naming the one that does not",
    response_model=Ready,
    responses={
        503: {
            "model": Problem,
            "content": {MEDIA_TYPE: {}},
            "description": "the database or Redis did not answer",
        }
    },
)
async def readyz() -> Any:  # Ready, or the 503 problem
    readiness = _readiness()
    failures = [
        failure
        for failure in await asyncio.gather(
            _check("database", metrics.check_database), _check("redis", metrics.check_redis)
        )
        if failure
    ]
    ready = not failures
    if ready != readiness.ready:  # once per change: probes come every few seconds
        if ready:
            log.info("ready: the database and Redis answer")
        else:
            log.warning("not ready: %s", "; ".join(failures))
        readiness.ready = ready
    if failures:
        return problem(503, "Service Unavailable", "; ".join(failures))
    return Ready(checks={"database": "ok", "redis": "ok"})


def _registry(request: Request) -> CollectorRegistry:
    # One registry per app, not prometheus_client's global default one: nothing else in the
    # process (or a second app in a test) can add to it or collide with it.
    registry: CollectorRegistry | None = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics_export.RoomkeeperCollector())
        request.app.state.metrics_registry = registry
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics, roomkeeper_ prefix",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}}, "description": "Prometheus text format"}},
)
async def prometheus_metrics(request: Request) -> Response:
    registry = _registry(request)
    # Prometheus's own text format unless the scraper asks for another (OpenMetrics, say).
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await run_in_threadpool(encode, registry)
    return Response(body, media_type=content_type)
