"""Bookings a second: one at a time and in batches, over Celery and over HTTP, beside the naive
recipe's send rate (CONTRACT §4.2, issue 10's goal: 10,000 bookings stored and answered in under
10 s in batches).

One stack as the Procfile runs it (sandbox, an embedded Redis, a fresh store, a worker, beat and
`roomkeeper web`), a token made by `roomkeeper tokens create`, then, each with its own booking ids,
all starting days ahead (so no room is due: this is intake, not creation):

- Celery, one at a time: `rooms.schedule_meeting` for each booking, all sent at once;
- Celery, batches: `rooms.schedule_meetings` with 1,000 bookings each, all sent at once;
- HTTP, one at a time: `PUT /v1/bookings/{id}` from N connections;
- HTTP, batches: `POST /v1/bookings/batch` with 1,000 each, from N connections;
- the naive recipe: its two `eta` sends per booking (nothing stored, nothing answered).

Each figure runs from the first send to the last answer, and every booking is then counted in the
store. `python -m bench.bookings [--bookings 10000] [--single 2000] [--connections 16]
[--batch-connections 2] [--database postgresql://…]`; `make bench` runs it as the phase `bookings`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx
from celery import Celery
from celery.result import ResultSet
from sqlalchemy import create_engine, text

from bench.common import BIN, ROOT, Stack, iso, machine, release, tree_peak_rss_mib, utcnow
from worker.devtools.localredis import free_port
from worker.store import sqlalchemy_url

BATCH = 1000
TIMEOUT = 600.0


def say(line: str) -> None:
    print(line, flush=True)


def bookings(prefix: str, n: int) -> list[dict[str, Any]]:
    start = utcnow() + timedelta(days=7)
    return [
        {
            "booking_id": f"{prefix}-{i:06d}",
            "start": iso(start + timedelta(minutes=i % (60 * 24 * 30))),
            "end": iso(start + timedelta(minutes=i % (60 * 24 * 30) + 45)),
            "metadata": {"n": i},
        }
        for i in range(n)
    ]


def figure(n: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"bookings": n, "seconds": round(seconds, 3), "per_s": round(n / seconds, 1), **extra}


# --------------------------------------------------------------------------------------------
# The ways in.


def celery_single(stack: Stack, items: list[dict[str, Any]]) -> dict[str, Any]:
    caller = stack.procs.caller
    t0 = time.monotonic()
    results = [caller.send_task("rooms.schedule_meeting", queue="rooms", kwargs=item) for item in items]
    sent = time.monotonic() - t0
    views = ResultSet(results).join_native(timeout=TIMEOUT, propagate=True)
    elapsed = time.monotonic() - t0
    release(caller, results)
    assert all(v["state"] == "scheduled" for v in views)
    return figure(len(items), elapsed, sent_s=round(sent, 3))


def book_in_batches(caller: Celery, items: Sequence[dict[str, Any]], timeout: float = TIMEOUT) -> float:
    """`rooms.schedule_meetings` with 1,000 items each, all sent at once: the seconds from the
    first send to the last answer. Raises when any item was refused."""
    t0 = time.monotonic()
    results = [
        caller.send_task("rooms.schedule_meetings", queue="rooms", kwargs={"bookings": items[i : i + BATCH]})
        for i in range(0, len(items), BATCH)
    ]
    answers = ResultSet(results).join_native(timeout=timeout, propagate=True)
    elapsed = time.monotonic() - t0
    release(caller, results)
    refused = [r for answer in answers for r in answer if not r["ok"]]
    if refused:
        raise RuntimeError(f"{len(refused)} of {len(items)} bookings refused, e.g. {refused[0]!r}")
    return elapsed


def celery_batches(stack: Stack, items: list[dict[str, Any]]) -> dict[str, Any]:
    elapsed = book_in_batches(stack.procs.caller, items)
    return figure(len(items), elapsed, batches=-(-len(items) // BATCH))


async def _http(base: str, token: str, jobs: list[tuple[str, str, Any]], connections: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=TIMEOUT, limits=limits) as client:

        async def sender() -> None:
            while not queue.empty():
                method, path, payload = queue.get_nowait()
                response = await client.request(method, path, content=json.dumps(payload))
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if method == "POST":
                    refused = [r for r in response.json()["results"] if not r["ok"]]
                    if refused:
                        statuses[-1] = statuses.get(-1, 0) + len(refused)

        await asyncio.gather(*(sender() for _ in range(connections)))
    return statuses


def http_single(base: str, token: str, items: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    jobs = [("PUT", f"/v1/bookings/{item['booking_id']}", item) for item in items]
    t0 = time.monotonic()
    statuses = asyncio.run(_http(base, token, jobs, connections))
    elapsed = time.monotonic() - t0
    assert statuses == {201: len(items)}, statuses
    return figure(len(items), elapsed, connections=connections)


def http_batches(base: str, token: str, items: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    jobs = [
        ("POST", "/v1/bookings/batch", {"bookings": items[i : i + BATCH]})
        for i in range(0, len(items), BATCH)
    ]
    t0 = time.monotonic()
    statuses = asyncio.run(_http(base, token, jobs, connections))
    elapsed = time.monotonic() - t0
    assert statuses == {200: len(jobs)}, statuses
    return figure(len(items), elapsed, batches=len(jobs), connections=connections)


def naive_sends(stack: Stack, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The naive recipe's two `eta` sends per booking (to a queue no worker here reads)."""
    from bench import naive
    from worker.devtools.harness import parse

    caller = stack.procs.caller
    t0 = time.monotonic()
    for item in items:
        start, end = parse(item["start"]), parse(item["end"])
        assert start is not None and end is not None
        naive.book(caller, item["booking_id"], start, end, 20.0)
    elapsed = time.monotonic() - t0
    with caller.connection_for_write() as connection:
        connection.default_channel.queue_purge(naive.QUEUE)
    return figure(len(items), elapsed, note="sent only: nothing stored, nothing answered")


# --------------------------------------------------------------------------------------------
# The phase.


def _stored(engine: Any, prefix: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM meeting WHERE booking_id LIKE :p"), {"p": f"{prefix}-%"}
            ).scalar_one()
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run(
    *, n: int, single: int, connections: int, batch_connections: int, database: str | None
) -> dict[str, Any]:
    stack = Stack.start("bookings", database=database, latency_ms=50.0)
    web = None
    try:
        made = subprocess.run(
            [str(BIN / "roomkeeper"), "tokens", "create", "bench"],
            cwd=ROOT,
            env=stack.procs.env,
            capture_output=True,
            text=True,
            check=True,
        )
        token = made.stdout.strip()
        port = free_port()
        web = subprocess.Popen(
            [str(BIN / "roomkeeper"), "web", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=stack.procs.env,
            stdout=(stack.logs / "web.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        stack.procs.wait_for(lambda: _answers(f"{base}/healthz"), timeout=30)
        engine = create_engine(sqlalchemy_url(stack.store.url))
        figures: dict[str, Any] = {"store": stack.store.label}
        modes = [
            ("celery_single", "cs", single, lambda items: celery_single(stack, items)),
            ("celery_batches", "cb", n, lambda items: celery_batches(stack, items)),
            ("http_single", "hs", single, lambda items: http_single(base, token, items, connections)),
            ("http_batches", "hb", n, lambda items: http_batches(base, token, items, batch_connections)),
            ("naive_sends", "nv", n, lambda items: naive_sends(stack, items)),
        ]
        for name, prefix, count, measure in modes:
            result = measure(bookings(prefix, count))
            if name != "naive_sends":
                result["stored"] = _stored(engine, prefix)
                assert result["stored"] == count, (name, result)
            figures[name] = result
            say(f"  {name}: {count} in {result['seconds']} s = {result['per_s']}/s")
        figures["memory_mib"] = {**stack.sample_memory(), "web": tree_peak_rss_mib(web.pid)}
        engine.dispose()
        return figures
    finally:
        if web is not None:
            web.terminate()
            web.wait(timeout=20)
        stack.stop()


def lines(f: dict[str, Any]) -> list[str]:
    out = [f"bookings a second ({f['store']}; stored and answered, from the first send to the last answer):"]
    labels = {
        "celery_single": "Celery, rooms.schedule_meeting one at a time, all sent at once",
        "celery_batches": "Celery, rooms.schedule_meetings, 1,000 a batch",
        "http_single": "HTTP, PUT /v1/bookings/{id}",
        "http_batches": "HTTP, POST /v1/bookings/batch, 1,000 a batch",
        "naive_sends": "naive eta recipe, sends only",
    }
    for key, label in labels.items():
        row = f.get(key)
        if row:
            conn = f", {row['connections']} connections" if "connections" in row else ""
            out.append(f"  {label}{conn}: {row['bookings']} in {row['seconds']} s = {row['per_s']}/s")
    return out


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """`make bench`'s phase `bookings` (bench/run.py)."""
    n = getattr(args, "intake", None) or 10_000
    return run(
        n=n,
        single=min(n, 2000),
        connections=16,
        batch_connections=2,
        database=getattr(args, "database", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bookings", type=int, default=10_000, help="for the batch modes and the naive sends"
    )
    parser.add_argument("--single", type=int, default=2000, help="for the one-at-a-time modes")
    parser.add_argument("--connections", type=int, default=16, help="HTTP connections, one at a time")
    parser.add_argument("--batch-connections", type=int, default=2, help="HTTP connections, batches")
    parser.add_argument("--database", default=None, help="a postgresql:// server URL; default SQLite")
    args = parser.parse_args(argv)
    say(f"machine: {machine()}")
    figures = run(
        n=args.bookings,
        single=args.single,
        connections=args.connections,
        batch_connections=args.batch_connections,
        database=args.database,
    )
    say("\n".join(lines(figures)))
    say(f"peak RSS MiB: {figures['memory_mib']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
