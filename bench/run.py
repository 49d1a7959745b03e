"""`make bench`: how precise, how fast and how frugal roomkeeper is, beside the naive recipe.

Every phase starts its own stack as the Procfile runs it (the sandbox as a process at 50 ms
latency, an embedded Redis, a fresh store, `celery -A worker.runtime.app worker --task-events` and
`celery -A worker.runtime.app beat`) and drives it through the contract from this process, by task name.
Figures come from the sandbox's own record of rooms and calls. One table is printed and the
same figures are written to var/bench.json.

    .venv/bin/python -m bench.run [--quick] [--only precision,naive,...] [--meetings N] ...

Phases: precision (N meetings whose ends fall within one minute), naive (the same load through
a Celery task per meeting with `eta`, plus its visibility-timeout duplicates), intake (10,000
bookings sent at once), bookings (bookings a second one at a time and in batches, over Celery
and HTTP, beside the naive recipe's sends), throughput (creations a second by worker concurrency),
store (dispatcher tick and reconciler pass with 10k..1M stored meetings, SQLite and PostgreSQL),
budget (100 points a minute and more work than that), burst (1,000, 3,000 and 10,000 meetings whose
rooms fall due within a few seconds, bench/burst.py). Peak memory of the worker and beat is read
off every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult, ResultSet

from bench.common import (
    ROOT,
    Booked,
    SandboxProcess,
    Stack,
    iso,
    lifecycle_figures,
    machine,
    percentiles,
    release,
    tree_peak_rss_mib,
    utcnow,
)
from worker.devtools.harness import parse
from worker.devtools.localredis import EmbeddedRedis
from worker.devtools.localredis import answers as redis_answers

PHASES = ("precision", "naive", "intake", "bookings", "throughput", "store", "budget", "burst")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
SEND_TIMEOUT = 600.0


def say(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Sending through the contract.


def send_schedules(caller: Celery, bookings: Sequence[Booked], **extra: Any) -> dict[str, float]:
    """Send every booking at once, then wait until each is stored and answered."""
    t0 = time.monotonic()
    results: list[AsyncResult[Any]] = []
    for booked in bookings:
        results.append(
            caller.send_task(
                "rooms.schedule_meeting",
                queue="rooms",
                kwargs={
                    "booking_id": booked.booking_id,
                    "start": iso(booked.start),
                    "end": iso(booked.end),
                    **extra,
                },
            )
        )
    sent = time.monotonic() - t0
    views = ResultSet(results).join_native(timeout=SEND_TIMEOUT, propagate=True)
    answered = time.monotonic() - t0
    release(caller, results)
    bad = [v for v in views if not isinstance(v, dict) or v.get("state") != "scheduled"]
    if bad:
        raise RuntimeError(f"{len(bad)} bookings were not accepted, e.g. {bad[0]!r}")
    return {"sent_s": round(sent, 3), "answered_s": round(answered, 3)}


def spread_within_a_minute(
    prefix: str, n: int, first_end_in: float, duration: float, rng: random.Random
) -> list[Booked]:
    now = utcnow()
    out = []
    for i in range(n):
        end = now + timedelta(seconds=first_end_in + rng.uniform(0, 60))
        out.append(Booked(f"{prefix}-{i:05d}", end - timedelta(seconds=duration), end))
    return out


def wait_until(predicate: Callable[[], bool], deadline: float, every: float = 1.0) -> bool:
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # a store busy for a moment: ask again
            pass
        time.sleep(every)
    return False


# --------------------------------------------------------------------------------------------
# Phases.


def phase_precision(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    lead = args.lead
    stack = Stack.start(
        "precision",
        database=args.database,
        latency_ms=args.latency,
        settings={"ROOMKEEPER_CREATE_LEAD_SECONDS": str(lead)},
    )
    try:
        bookings = spread_within_a_minute(
            "prec", args.meetings, lead + args.duration + 30, args.duration, rng
        )
        intake = send_schedules(stack.procs.caller, bookings)
        say(f"  precision: {len(bookings)} booked in {intake['answered_s']} s; waiting for their ends")
        last_end = max(b.end for b in bookings)
        settle = time.monotonic() + (last_end - utcnow()).total_seconds() + 30

        def done() -> bool:
            return utcnow() > last_end and not stack.sandbox.admin.rooms(include_deleted=False)

        wait_until(done, settle)
        audit = stack.procs.audit()
        figures = lifecycle_figures(
            bookings, audit.rooms, audit.strangers, stack.sandbox.admin.calls(), lead, utcnow()
        )
        figures["booking"] = intake
        figures["memory_mib"] = dict(stack.sample_memory())
        return figures
    finally:
        stack.stop()


def phase_intake(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    stack = Stack.start("intake", database=args.database, latency_ms=args.latency)
    try:
        start = utcnow() + timedelta(days=7)
        bookings = [
            Booked(
                f"intake-{i:06d}",
                start + timedelta(minutes=rng.randint(0, 60 * 24 * 30)),
                start + timedelta(days=31),
            )
            for i in range(args.intake)
        ]
        runs = [send_schedules(stack.procs.caller, bookings)]
        rate = len(bookings) / runs[0]["answered_s"]
        say(f"  intake: {len(bookings)} bookings answered in {runs[0]['answered_s']} s ({rate:.0f}/s)")
        stored = len(stack.procs.states())
        return {
            "bookings": len(bookings),
            "sent_s": runs[0]["sent_s"],
            "answered_s": runs[0]["answered_s"],
            "bookings_per_s": round(rate, 1),
            "stored": stored,
            "memory_mib": dict(stack.sample_memory()),
        }
    finally:
        stack.stop()


def creation_rate(calls: list[dict[str, Any]]) -> dict[str, Any]:
    times = sorted(t for c in calls if c["method"] == "POST" and c["status"] == 201 if (t := parse(c["at"])))
    if len(times) < 10:
        return {"created": len(times), "per_s": None, "steady_per_s": None}
    span = (times[-1] - times[0]).total_seconds()
    lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
    steady = (len(times) * 8 // 10) / max(1e-6, (hi - lo).total_seconds())
    return {
        "created": len(times),
        "span_s": round(span, 3),
        "per_s": round(len(times) / max(1e-6, span), 1),
        "steady_per_s": round(steady, 1),
    }


def phase_throughput(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    rows = []
    # One worker process per thread count, then as many processes as the host has cores.
    cores = os.cpu_count() or 1
    shapes: list[tuple[int, int, str | None]] = [(1, c, args.database) for c in args.concurrency]
    shapes.append((cores, 16, args.database))
    if args.postgres and args.database is None:
        shapes.append((cores, 16, args.postgres))  # the production store
    for processes, concurrency, database in shapes:
        # A run's rate moves by ±15 % from one run to the next on a shared host: quote the median.
        runs = [
            throughput_run(args, processes, concurrency, database, n) for n in range(args.throughput_repeats)
        ]
        row = throughput_median(runs)
        rows.append(row)
        say(
            f"  throughput: {processes} x {concurrency} threads, {row['store']}: {row['per_s']}/s "
            f"(median of {len(runs)}: {row['per_s_runs']}), "
            f"worker CPU {row['cpu_ms_per_creation']} ms a creation"
        )
    return {
        "pool": "threads",
        "latency_ms": args.latency,
        "meetings": args.throughput_meetings,
        "repeats": args.throughput_repeats,
        "rows": rows,
    }


def throughput_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per shape: the median of each rate over the runs, the runs' rates beside it."""

    def median_of(key: str) -> float | None:
        values = [run[key] for run in runs if run.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    row = dict(runs[len(runs) // 2])  # shape, store, memory: the same in every run
    for key in ("per_s", "steady_per_s", "cpu_ms_per_creation", "from_due_s"):
        row[key] = median_of(key)
    row["per_s_runs"] = [run.get("per_s") for run in runs]
    row["created"] = min(run.get("created", 0) for run in runs)
    return row


def throughput_run(
    args: argparse.Namespace, processes: int, concurrency: int, database: str | None, n: int
) -> dict[str, Any]:
    stack = Stack.start(
        f"throughput{processes}x{concurrency}r{n}",  # also a PostgreSQL schema name
        database=database,
        latency_ms=args.latency,
        settings={
            "ROOMKEEPER_CREATE_LEAD_SECONDS": "5",
            "ROOMKEEPER_WORKER_CONCURRENCY": str(concurrency),
        },
        workers=processes,
    )
    try:
        # Every creation falls due at one instant T, after all are booked and dispatched.
        margin = 10 + args.throughput_meetings / 80
        due = utcnow() + timedelta(seconds=margin)
        bookings = [
            Booked(
                f"tp{processes}x{concurrency}-{n}-{i:05d}",
                due + timedelta(seconds=5),
                due + timedelta(hours=2),
            )
            for i in range(args.throughput_meetings)
        ]
        intake = send_schedules(stack.procs.caller, bookings)
        if utcnow() > due:
            say(f"  throughput: booking took {intake['answered_s']} s, past the common due instant")
        wanted, admin = len(bookings), stack.sandbox.admin
        # The workers' CPU time from the due instant to the last room: what a creation costs.
        time.sleep(max(0.0, (due - utcnow()).total_seconds() - 0.5))
        cpu_before = stack.worker_cpu_seconds()
        wait_until(lambda: len(admin.rooms(include_deleted=False)) >= wanted, time.monotonic() + margin + 120)
        cpu_used = stack.worker_cpu_seconds() - cpu_before
        figures = creation_rate(admin.calls())
        figures["cpu_ms_per_creation"] = (
            round(1000 * cpu_used / figures["created"], 2) if figures["created"] else None
        )
        figures["from_due_s"] = None
        rooms = admin.rooms()
        if rooms:
            last = max(parse(r["created_at"]) or due for r in rooms)
            figures["from_due_s"] = round((last - due).total_seconds(), 3)
        figures.update(
            processes=processes,
            concurrency=concurrency,
            store=stack.store.label,
            memory_mib=dict(stack.sample_memory()),
        )
        return figures
    finally:
        stack.stop()


def phase_budget(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    budget, lead, duration = 100, 10.0, 20.0
    stack = Stack.start(
        "budget",
        database=args.database,
        latency_ms=args.latency,
        sandbox_points_per_minute=budget,
        settings={
            "ROOMKEEPER_CREATE_LEAD_SECONDS": str(lead),
            "ROOMKEEPER_API_POINTS_PER_MINUTE": str(budget),
            "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "60",
        },
    )
    try:
        bookings = spread_within_a_minute("budget", args.budget_meetings, lead + duration + 15, duration, rng)
        send_schedules(stack.procs.caller, bookings)
        last_end = max(b.end for b in bookings)
        need = args.budget_meetings * 5
        say(f"  budget: {len(bookings)} meetings need {need} points; the budget is {budget} a minute")
        deadline = time.monotonic() + (last_end - utcnow()).total_seconds() + 240

        def settled() -> bool:
            states = stack.procs.states()
            return all(s in ("ended", "failed", "cancelled") for s in states.values()) and not (
                stack.sandbox.admin.rooms(include_deleted=False)
            )

        wait_until(settled, deadline, every=2)
        calls = stack.sandbox.admin.calls()
        audit = stack.procs.audit()
        figures = lifecycle_figures(bookings, audit.rooms, audit.strangers, calls, lead, utcnow())
        states = stack.procs.states()
        # Did ended rooms go first? A creation made while some room had been due for deletion
        # for more than 2 s (its meeting over, the room still live) put a creation ahead of it.
        ends = {b.booking_id: b.end for b in bookings}
        rooms = [
            (parse(r["created_at"]), parse(r["deleted_at"]), ends[booking])
            for booking, rs in audit.rooms.items()
            for r in rs
        ]
        ahead = 0
        creations = [parse(c["at"]) for c in calls if c["method"] == "POST" and c["status"] == 201]
        for made in creations:
            assert made is not None
            for created, deleted, end in rooms:
                assert created is not None
                if (
                    created < made
                    and end + timedelta(seconds=2) < made
                    and (deleted is None or deleted > made)
                ):
                    ahead += 1
                    break
        late = [
            ((parse(r["created_at"]) or b.start) - (b.start - timedelta(seconds=lead))).total_seconds()
            for b in bookings
            for r in audit.rooms.get(b.booking_id, [])[:1]
        ]
        spent = sum(int(c.get("points") or 0) for c in calls)
        figures.update(
            points_per_minute=budget,
            points_needed=need,
            points_spent=spent,
            points_per_meeting=round(spent / len(bookings), 2),
            failed=sum(1 for s in states.values() if s == "failed"),
            creation_delay_s=percentiles(late),
            creations_ahead_of_an_overdue_deletion=ahead,
            memory_mib=dict(stack.sample_memory()),
        )
        return figures
    finally:
        stack.stop()


def phase_store(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    from bench import store_scaling

    out: dict[str, Any] = {}
    databases: list[str] = ["sqlite"]
    if redis_answers(args.redis) and args.postgres:
        databases.append(args.postgres)
    for database in databases:
        result = store_scaling.run(database, sizes=args.sizes, repeats=args.repeats, log=say)
        out[result["database"]] = result
    return out


def phase_naive(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The same load as `precision` through the common recipe: one task per meeting with `eta`
    at its creation time and one at its end, on the same client and worker settings."""
    from bench import naive, naive_run

    lead = args.lead
    logs = Path(tempfile.mkdtemp(prefix="roomkeeper-bench-naive-"))
    sandbox = SandboxProcess(args.latency, 0, logs)
    redis = EmbeddedRedis().start()
    caller = Celery(broker=redis.url)
    workers = naive_run.start_naive_workers(redis.url, sandbox.url, concurrency=16, logs=logs)
    try:
        bookings = spread_within_a_minute(
            "naive", args.meetings, lead + args.duration + 30, args.duration, rng
        )
        t0 = time.monotonic()
        for booked in bookings:
            naive.book(caller, booked.booking_id, booked.start, booked.end, lead)
        sent = round(time.monotonic() - t0, 3)
        say(f"  naive: {len(bookings)} booked (2 ETA tasks each) in {sent} s; waiting for their ends")
        last_end = max(b.end for b in bookings)
        wait_until(
            lambda: utcnow() > last_end and not sandbox.admin.rooms(include_deleted=False),
            time.monotonic() + (last_end - utcnow()).total_seconds() + 30,
        )
        owner = {naive.room_prefix(b.booking_id): b.booking_id for b in bookings}
        rooms_of: dict[str, list[dict[str, Any]]] = {}
        strangers = []
        for room in sandbox.admin.rooms():
            name = (room["room_name"] or "").lstrip("/")
            booking = next((b for p, b in owner.items() if name.startswith(p)), None)
            if booking is None:
                strangers.append(room)
            else:
                rooms_of.setdefault(booking, []).append(room)
        figures = lifecycle_figures(bookings, rooms_of, strangers, sandbox.admin.calls(), lead, utcnow())
        figures["booking"] = {"sent_s": sent}
        figures["memory_mib"] = {
            f"worker{n}": tree_peak_rss_mib(pid) for n, pid in enumerate(workers.pids, 1)
        }
    finally:
        workers.stop()
        caller.close()
        redis.stop()
    try:
        visibility = []
        for scenario in naive_run.SCENARIOS:
            sandbox.admin.reset()
            fresh = EmbeddedRedis().start()
            try:
                result = naive_run.visibility_experiment(fresh.url, sandbox.url, scenario=scenario)
            finally:
                fresh.stop()
            say(
                f"  naive, {scenario}: {result.get('duplicate_create_executions')} duplicate creations, "
                f"{result.get('duplicate_rooms')} duplicate rooms"
            )
            visibility.append(result)
        figures["visibility"] = visibility[0]
        figures["visibility_runs"] = visibility
    finally:
        sandbox.stop()
    return figures


def phase_bookings(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Bookings a second, one at a time and in batches, over Celery and HTTP (bench/bookings.py)."""
    from bench import bookings

    return bookings.phase(args)


def phase_burst(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Bursts of due work on one worker: every room made and deleted, and at what cost (bench/burst.py)."""
    from bench import burst

    return burst.phase(args)


RUNNERS: dict[str, Callable[[argparse.Namespace, random.Random], dict[str, Any]]] = {
    "precision": phase_precision,
    "naive": phase_naive,
    "intake": phase_intake,
    "throughput": phase_throughput,
    "store": phase_store,
    "budget": phase_budget,
    "bookings": phase_bookings,
    "burst": phase_burst,
}


# --------------------------------------------------------------------------------------------
# The report.


def _lag(p: dict[str, Any] | None) -> str:
    if not p or p.get("n", 0) == 0:
        return "-"
    return f"{p['p50']:.3f} / {p['p95']:.3f} / {p['p99']:.3f} / {p['max']:.3f}"


def table(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']}", ""]
    phases = report["phases"]
    if "precision" in phases or "naive" in phases:
        lines.append(
            f"{'lifecycle':<24}{'lag p50/p95/p99/max s':<36}{'ready early min/p50 s':<24}"
            f"{'calls/mtg':<11}{'dup':<5}{'leak':<5}"
        )
        for name, key in (("roomkeeper", "precision"), ("naive eta recipe", "naive")):
            f = phases.get(key)
            if not f or "deletion_lag_s" not in f:
                continue
            early = f["ready_before_start_s"]
            lines.append(
                f"{name:<24}{_lag(f['deletion_lag_s']):<36}"
                f"{early['min']} / {early['p50']} (lead {early['lead_s']}){'':<2}"
                f"{f['calls_per_meeting']:<11}{f['duplicates']:<5}{f['leaks']:<5}"
            )
        vis = (phases.get("naive") or {}).get("visibility")
        if vis:
            lines.append(
                f"naive, eta {vis.get('eta_s')} s > visibility timeout {vis.get('visibility_timeout_s')} s: "
                f"{vis.get('duplicate_create_executions')} duplicate executions, "
                f"{vis.get('duplicate_rooms')} duplicate rooms for {vis.get('meetings')} meetings"
            )
        lines.append("")
    if "intake" in phases:
        f = phases["intake"]
        lines.append(
            f"intake: {f['bookings']} bookings sent at once, all stored and answered in {f['answered_s']} s "
            f"= {f['bookings_per_s']} bookings/s"
        )
    if "bookings" in phases:
        from bench import bookings

        lines.extend(bookings.lines(phases["bookings"]))
    if "throughput" in phases:
        f = phases["throughput"]
        lines.append(f"throughput (pool {f['pool']}, sandbox latency {f['latency_ms']} ms, budget off):")
        for row in f["rows"]:
            lines.append(
                f"  {row['processes']} process(es) x {row['concurrency']:>3} threads, {row.get('store')}: "
                f"{row['per_s']} creations/s (runs {row.get('per_s_runs')}; "
                f"steady {row['steady_per_s']}/s, {row['created']} rooms), "
                f"worker CPU {row.get('cpu_ms_per_creation')} ms a creation"
            )
    if "store" in phases:
        for label, f in phases["store"].items():
            if not isinstance(f, dict):
                continue
            lines.append(f"store scaling, {label} ({f.get('due_rows')} due rows):")
            for row in f["rows"]:
                lines.append(
                    f"  {row['stored']:>9} stored: tick {row['tick_ms']['median']} ms, "
                    f"reconcile {row['reconcile_ms']['median']} ms (medians of {f.get('repeats', '?')})"
                )
    if "budget" in phases:
        f = phases["budget"]
        lines.append(
            f"budget {f['points_per_minute']}/min, {f['meetings']} meetings needing {f['points_needed']} "
            f"points: {f['points_per_meeting']} points/meeting, {f['status_429']} 429s, "
            f"deletion lag p50/p95/max {f['deletion_lag_s']['p50']}/{f['deletion_lag_s']['p95']}/"
            f"{f['deletion_lag_s']['max']} s, creation delay p50/max {f['creation_delay_s']['p50']}/"
            f"{f['creation_delay_s']['max']} s, creations ahead of an overdue deletion "
            f"{f['creations_ahead_of_an_overdue_deletion']}, failed {f['failed']}"
        )
    if "burst" in phases:
        from bench import burst

        lines.extend(burst.lines(phases["burst"]))
    memory = report.get("peak_memory_mib")
    if memory:
        lines.append(f"peak memory (VmHWM): worker {memory['worker']} MiB, beat {memory['beat']} MiB")
    return "\n".join(lines)


def peak_memory(phases: dict[str, Any]) -> dict[str, float | None]:
    worker: list[float] = []
    beat: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "memory_mib" and isinstance(value, dict):
                    worker.extend(v for k, v in value.items() if k.startswith("worker") and v)
                    beat.extend(v for k, v in value.items() if k.startswith("beat") and v)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(phases)
    return {"worker": max(worker, default=None), "beat": max(beat, default=None)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller figures, about ten minutes in all")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases, of {','.join(PHASES)}")
    parser.add_argument("--meetings", type=int, help="precision and naive load (default 1000)")
    parser.add_argument("--intake", type=int, help="bookings sent at once (default 10000)")
    parser.add_argument("--throughput-meetings", type=int, help="creations per concurrency (default 2000)")
    parser.add_argument("--concurrency", help="worker thread counts (default 4,16,32,64)")
    parser.add_argument("--throughput-repeats", type=int, help="runs per throughput shape (default 3)")
    parser.add_argument("--sizes", help="stored meetings for store scaling (default 10000,100000,1000000)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of timed store operations")
    parser.add_argument("--budget-meetings", type=int, default=40)
    parser.add_argument(
        "--burst-sizes", help="burst: meetings[/window s], e.g. 1000/5,3000/3 (default 1000,3000,10000)"
    )
    parser.add_argument(
        "--burst-window", type=float, default=3.0, help="burst: seconds the rooms fall due within"
    )
    parser.add_argument("--burst-concurrency", type=int, default=16, help="burst: the worker's threads")
    parser.add_argument("--latency", type=float, default=50.0, help="sandbox latency, ms")
    parser.add_argument("--lead", type=float, default=20.0, help="ROOMKEEPER_CREATE_LEAD_SECONDS")
    parser.add_argument("--duration", type=float, default=30.0, help="meeting length, s")
    parser.add_argument("--database", help="postgresql://… for the lifecycle phases; default SQLite")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL for store scaling ('' skips)"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "var" / "bench.json"))
    args = parser.parse_args(argv)
    quick = args.quick
    args.meetings = args.meetings or (200 if quick else 1000)
    args.intake = args.intake or (2000 if quick else 10_000)
    args.throughput_meetings = args.throughput_meetings or (500 if quick else 2000)
    args.throughput_repeats = args.throughput_repeats or (1 if quick else 3)
    args.concurrency = [int(x) for x in (args.concurrency or ("16" if quick else "4,16,32,64")).split(",")]
    args.sizes = [
        int(x) for x in (args.sizes or ("10000,100000" if quick else "10000,100000,1000000")).split(",")
    ]
    from bench.burst import parse_sizes

    args.burst_sizes = parse_sizes(
        args.burst_sizes or ("1000" if quick else "1000,3000,10000"), args.burst_window
    )
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"--only: unknown phases {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"machine": machine(), "started_at": iso(utcnow()), "phases": {}}
    args_view = {k: v for k, v in vars(args).items() if k not in ("redis",)}
    report["args"] = args_view
    say(f"bench: phases {', '.join(args.only)} on {report['machine']}")
    t0 = time.monotonic()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only:
        started = time.monotonic()
        say(f"[{name}]")
        try:
            report["phases"][name] = RUNNERS[name](args, rng)
        except Exception as error:  # one phase failing must not lose the others' figures
            failed.append(name)
            say(f"  {name} failed: {type(error).__name__}: {error}")
            report["phases"][name] = {"error": f"{type(error).__name__}: {error}"}
        report["phases"][name]["took_s"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["took_s"] = round(time.monotonic() - t0, 1)
    report["peak_memory_mib"] = peak_memory(report["phases"])
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    say("")
    say(table({**report, "phases": {k: v for k, v in report["phases"].items() if "error" not in v}}))
    say(f"\nfigures written to {out} (took {report['took_s']} s)")
    if failed:
        say(f"FAILED phases: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
