"""How fast the `web` process answers Whereby's webhooks under load, and how soon a worker applies them.

Whereby waits 5 s for an answer. This phase starts the stack as the Procfile runs it (sandbox,
Redis, a fresh store, a worker, beat and `roomkeeper web`), makes rooms for a few meetings, then
sends signed `room.client.joined` / `room.client.left` webhooks from many connections at once (a
tenth of them repeated deliveries), and prints the answer latency, the rate, and how long until
every event was applied to its room.

    .venv/bin/python -m bench.webhooks [--events 4000] [--concurrency 32] [--rooms 20] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from bench.common import Booked, Stack, iso, machine, percentiles, tree_peak_rss_mib, utcnow
from worker.adapters.signing import signature
from worker.devtools.localredis import free_port
from worker.store import sqlalchemy_url

SECRET = "bench-webhook-secret"


def sign(body: bytes) -> str:
    return signature(SECRET, body, int(time.time()))


def bodies(rooms: list[dict[str, Any]], count: int) -> list[bytes]:
    """Joins and leaves over the rooms, each with its own id and a later createdAt; a tenth repeated."""
    out: list[bytes] = []
    clients = dict.fromkeys(range(len(rooms)), 0)
    at = utcnow()
    while len(out) < count:
        index = random.randrange(len(rooms))
        joining = clients[index] == 0 or random.random() < 0.5
        clients[index] += 1 if joining else -1
        at += timedelta(milliseconds=1)
        body = json.dumps(
            {
                "id": str(uuid.uuid4()),
                "apiVersion": "1.0",
                "createdAt": iso(at),
                "type": "room.client.joined" if joining else "room.client.left",
                "data": {
                    "meetingId": rooms[index]["meeting_id"],
                    "roomName": rooms[index]["room_name"],
                    "numClients": clients[index],
                },
            }
        ).encode()
        out.append(body)
        if random.random() < 0.1:
            out.append(body)  # Whereby may deliver one event twice
    return out[:count]


async def flood(
    url: str, payloads: list[bytes], concurrency: int
) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in payloads:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def sender() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                response = await client.post(
                    url,
                    content=body,
                    headers={"Content-Type": "application/json", "Whereby-Signature": sign(body)},
                )
                latencies.append(time.perf_counter() - t0)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return latencies, statuses, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--database", default=None, help="a postgresql:// server URL; default SQLite")
    args = parser.parse_args(argv)
    settings = {"ROOMKEEPER_WHEREBY_WEBHOOK_SECRET": SECRET, "ROOMKEEPER_OVERRUN_MAX_SECONDS": "600"}
    stack = Stack.start("webhooks", database=args.database, latency_ms=0, settings=settings)
    port = free_port()
    web = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "roomkeeper"),
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=stack.procs.env,
        stdout=(stack.logs / "web.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        stack.procs.wait_for(lambda: _answers(f"{base}/openapi.json"), timeout=30)
        start = utcnow() + timedelta(seconds=2)
        booked = [Booked(f"hooks-{n}", start, start + timedelta(minutes=30)) for n in range(args.rooms)]
        for item in booked:
            stack.procs.book(item.booking_id, item.start, item.end)
        views = stack.procs.wait_for(lambda: _rooms(stack, booked), timeout=60)
        payloads = bodies(views, args.events)
        latencies, statuses, elapsed = asyncio.run(
            flood(f"{base}/whereby/webhooks", payloads, args.concurrency)
        )
        t0 = time.monotonic()
        engine = create_engine(sqlalchemy_url(stack.store.url))
        stack.procs.wait_for(lambda: _unapplied(engine) == 0, timeout=300)
        applied_after = time.monotonic() - t0
        lat = percentiles(latencies)
        print(f"machine: {machine()}")
        print(
            f"store: {stack.store.label}; {len(payloads)} webhooks over {args.rooms} rooms, "
            f"{args.concurrency} connections"
        )
        print(f"answers: {statuses}")
        print(f"rate: {len(payloads) / elapsed:.0f} webhooks/s")
        print(
            "answer latency s: "
            + ", ".join(f"{k}={lat[k]}" for k in ("p50", "p95", "p99", "max") if k in lat)
            + " (Whereby waits 5 s)"
        )
        print(f"all applied by the worker {applied_after:.2f} s after the last answer")
        print(f"web peak RSS: {tree_peak_rss_mib(web.pid)} MiB")
    finally:
        web.terminate()
        web.wait(timeout=20)
        stack.stop()
    return 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _rooms(stack: Stack, booked: list[Booked]) -> list[dict[str, Any]] | None:
    views = [stack.procs.send("rooms.get_meeting", booking_id=item.booking_id) for item in booked]
    if all(view["state"] == "ready" for view in views):
        return [view["room"] for view in views]
    return None


def _unapplied(engine: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM webhook_event WHERE applied_at IS NULL")
            ).scalar_one()
        )


if __name__ == "__main__":
    sys.exit(main())
