"""A burst of due work (issue 16): N meetings whose rooms all fall due within S seconds, and whose
ends fall within S seconds too (no delete grace), on one worker as the Procfile runs it.

Each meeting starts 5 s after its room is due and lasts `meeting_seconds(N)` (N / 40 s, at least
30 s: time enough to make every room before the first end, so a room missing at the end is the
service's doing). The meetings are booked well before they fall due, in batches of 1,000
(`rooms.schedule_meetings`), far enough ahead that beat's dispatcher, not the booking, sends their
creations. Then the run watches Whereby's side (the sandbox's record of calls and rooms) until
every room made has been deleted and no meeting waits any more, or gives up a bounded time after
the last end, and reports:

- rooms made, and how late each was against its due instant (p50 / p99 / max);
- rooms still live some seconds after their meeting's end, and the deletion lag (p50 / p99 / max);
- messages received per row, counted from the worker's own log (`Task rooms.create_room[…]
  received`), and how many of them were skipped as duplicate deliveries;
- the worker's CPU seconds per room (from /proc), and what beat dispatched.

`tests/processes/test_burst.py` runs the same load through `run` on its own processes and asserts outcomes.

    python -m bench.burst [--sizes 1000,3000,10000] [--window 3] [--concurrency 16]
                          [--meeting-seconds S] [--database postgresql://…] [--give-up S] [--keep]

A size may carry its own window: `--sizes 1000/5,3000/3`. `make bench ARGS="--only burst"` runs it
as a phase of the benchmark (`--burst-sizes`, `--burst-window`, `--burst-concurrency`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import text

from bench.bookings import book_in_batches
from bench.common import (
    SERVICE_SETTINGS,
    Booked,
    Stack,
    cpu_seconds,
    iso,
    machine,
    percentiles,
    tree_total,
    utcnow,
)
from worker.devtools.harness import ProcessSystem, parse
from worker.devtools.sandbox import SandboxAdmin

LEAD_SECONDS = 5.0  # the room is due this long before the start
LIVE_AFTER_END_SECONDS = 10.0  # "still live" means this long after the end, or never deleted
CREATE_TASK, DELETE_TASK = "rooms.create_room", "rooms.delete_room"


def say(line: str) -> None:
    print(line, flush=True)


def settings(concurrency: int = 16, lead: float = LEAD_SECONDS) -> dict[str, str]:
    """The service's defaults (bench/common.py), with a short lead, no delete grace, budget off."""
    return {
        **SERVICE_SETTINGS,
        "ROOMKEEPER_CREATE_LEAD_SECONDS": str(lead),
        "ROOMKEEPER_DELETE_GRACE_SECONDS": "0",
        "ROOMKEEPER_API_POINTS_PER_MINUTE": "0",
        "ROOMKEEPER_WORKER_CONCURRENCY": str(concurrency),
    }


def meeting_seconds(n: int) -> float:
    """Start to end: long enough that a worker making 40 rooms a second (a third of what one
    worker process makes here when nothing else is due) has made every room before the first
    end, so that a room missing at the end is the service's failure, not the machine's size."""
    return max(30.0, n / 40)


def give_up_after(n: int) -> float:
    """How long after the last end a run of n meetings waits before it reports what it has."""
    return max(60.0, 0.03 * n)


# --------------------------------------------------------------------------------------------
# The load.


def plan(
    prefix: str, n: int, first_due: datetime, window: float, lead: float, duration: float
) -> list[Booked]:
    """n meetings whose rooms fall due evenly over `window` seconds from `first_due`."""
    out = []
    for i in range(n):
        due = first_due + timedelta(seconds=window * i / max(1, n - 1))
        start = due + timedelta(seconds=lead)
        out.append(Booked(f"{prefix}-{i:05d}", start, start + timedelta(seconds=duration)))
    return out


def book(caller: Celery, bookings: Sequence[Booked], timeout: float = 300.0) -> float:
    """Book them all in batches of 1,000, sent at once; the seconds until the last answer."""
    items = [{"booking_id": b.booking_id, "start": iso(b.start), "end": iso(b.end)} for b in bookings]
    return book_in_batches(caller, items, timeout)


# --------------------------------------------------------------------------------------------
# The processes' own logs.

_TASK_LINE = re.compile(
    r"Task (rooms\.[\w.]+)\[[^\]]+\] (?:(received)$|succeeded in [^:]*: '?(.*?)'?$|raised \w+: (.*)$)"
)
_LEVEL = re.compile(r"\[[^\]]*: (WARNING|ERROR|CRITICAL)/")
_DISPATCHED = re.compile(r"(dispatched|recovered) (\d+) creations and (\d+) deletions")


@dataclass
class LogCounts:
    """What a process's log says happened, per task: messages received, skipped, failed."""

    received: dict[str, int] = field(default_factory=dict)
    # did nothing: its claim taken, or another copy of it running or done
    skipped_duplicate: dict[str, int] = field(default_factory=dict)
    skipped_other: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # raised (a failed Whereby call, mostly)
    levels: dict[str, int] = field(default_factory=dict)  # WARNING / ERROR / CRITICAL lines
    # "dispatched" (due work), "recovered" (sent again by the recovery pass), where the log says so
    dispatched: dict[str, int] = field(default_factory=dict)
    dispatch_lines: int = 0
    ticks_skipped: int = 0  # beat: "skipped this tick: its previous run is still going"

    def add(self, line: str) -> None:
        if found := _LEVEL.search(line):
            _bump(self.levels, found.group(1))
        if found := _TASK_LINE.search(line):
            task, received, result, error = found.groups()
            if received:
                _bump(self.received, task)
            elif error is not None:
                _bump(self.failed, task)
            elif result is not None and result.startswith("skipped"):
                duplicate = any(word in result for word in ("duplicate", "claim already taken", "copy"))
                _bump(self.skipped_duplicate if duplicate else self.skipped_other, task)
        elif found := _DISPATCHED.search(line):
            how, creations, deletions = found.groups()
            _bump(self.dispatched, f"{how} creations", int(creations))
            _bump(self.dispatched, f"{how} deletions", int(deletions))
            self.dispatch_lines += 1
        elif "skipped this tick" in line:
            self.ticks_skipped += 1


def _bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


class LogReader:
    """Counts a log file's lines as they are written: each read takes only what is new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.counts = LogCounts()

    def update(self) -> LogCounts:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return self.counts
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next read
        self.offset += end
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            self.counts.add(line)
        return self.counts


def count_lines(lines: Iterable[str]) -> LogCounts:
    counts = LogCounts()
    for line in lines:
        counts.add(line)
    return counts


# --------------------------------------------------------------------------------------------
# Driving one burst on running processes, and its figures.


@dataclass
class Watched:
    """What the sandbox's call log showed while the run waited."""

    made: int = 0  # POST 201
    deleted: int = 0  # DELETE 204
    calls: int = 0
    seq: int = 0
    last_call: float = field(default_factory=time.monotonic)
    outcome: str = "gave up"

    def take(self, calls: list[dict[str, Any]]) -> None:
        for call in calls:
            self.seq = max(self.seq, int(call["seq"]))
            self.calls += 1
            if call["method"] == "POST" and call["status"] == 201:
                self.made += 1
            elif call["method"] == "DELETE" and call["status"] == 204:
                self.deleted += 1
        if calls:
            self.last_call = time.monotonic()


def run(
    procs: ProcessSystem,
    admin: SandboxAdmin,
    *,
    n: int,
    window: float,
    prefix: str = "burst",
    lead: float = LEAD_SECONDS,
    duration: float | None = None,
    give_up_s: float | None = None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Book a burst on a running worker and beat (started by the caller, with `settings()`),
    watch it from Whereby's side until every room is made and deleted or the deadline passes,
    and return its figures. Stops nothing: the caller owns the processes."""
    duration = meeting_seconds(n) if duration is None else duration
    dispatch_interval = float(procs.env.get("ROOMKEEPER_DISPATCH_INTERVAL_SECONDS", "15"))
    # Far enough ahead that the booking is over and beat's dispatcher sends the creations.
    booking_estimate = 3.0 + n / 1000
    first_due = utcnow() + timedelta(seconds=booking_estimate + dispatch_interval + 2)
    bookings = plan(prefix, n, first_due, window, lead, duration)
    booked_s = book(procs.caller, bookings)
    ahead = (first_due - utcnow()).total_seconds()
    log(f"  burst {n} within {window} s: booked in {booked_s:.1f} s, {ahead:.1f} s before the first due")

    worker_logs = [LogReader(procs.logs / f"worker{i}.log") for i in range(1, len(procs.workers) + 1)]
    beat_logs = [LogReader(procs.logs / f"beat{i}.log") for i in range(1, len(procs.beats) + 1)]
    last_end = max(b.end for b in bookings)
    give_up = give_up_s if give_up_s is not None else give_up_after(n)
    deadline = time.monotonic() + (last_end - utcnow()).total_seconds() + give_up
    time.sleep(max(0.0, ahead - 0.5))
    load_at_due = os.getloadavg()
    cpu_before = _cpu(procs)
    t_due = time.monotonic()
    watched = Watched(seq=max((int(c["seq"]) for c in admin.calls()), default=0))
    next_report = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(2.0)
        watched.take(admin.calls(since=watched.seq))
        over = utcnow() > last_end
        # Every room made has been deleted, and no meeting waits for a room any more (each one
        # ended, or failed: it ended before its room could be made).
        settled = over and watched.deleted >= watched.made
        if settled and not admin.rooms(include_deleted=False) and _all_final(procs):
            watched.outcome = "done"
            break
        if time.monotonic() >= next_report:
            next_report += 10
            counts = _merged(r.update() for r in worker_logs)
            log(
                f"    +{time.monotonic() - t_due:.0f} s: {watched.made} made, {watched.deleted} deleted; "
                f"received {counts.received.get(CREATE_TASK, 0)} creations, "
                f"{counts.received.get(DELETE_TASK, 0)} deletions; skipped as duplicates "
                f"{sum(counts.skipped_duplicate.values())}"
            )
    cpu_used = _cpu(procs) - cpu_before
    took = time.monotonic() - t_due
    figures = burst_figures(
        bookings,
        procs.audit().rooms,
        worker=_merged(r.update() for r in worker_logs),
        beat=_merged(r.update() for r in beat_logs),
        lead=lead,
        checked_at=utcnow(),
    )
    made = figures["rooms_made"]
    figures.update(
        window_s=window,
        lead_s=lead,
        duration_s=duration,
        concurrency=int(procs.env.get("ROOMKEEPER_WORKER_CONCURRENCY", "0")),
        booked_s=round(booked_s, 2),
        booked_ahead_of_due_s=round(ahead, 2),
        outcome=watched.outcome,
        watched_s=round(took, 1),
        last_whereby_call_s_before_end=round(time.monotonic() - watched.last_call, 1),
        store_states=_store_states(procs),
        worker_cpu_s=round(cpu_used, 2),
        worker_cpu_ms_per_room=round(1000 * cpu_used / made, 2) if made else None,
        load_at_due=[round(x, 2) for x in load_at_due],
        load_at_end=[round(x, 2) for x in os.getloadavg()],
        whereby_calls=watched.calls,
    )
    return figures


def _all_final(procs: ProcessSystem) -> bool:
    with procs.engine.connect() as connection:
        waiting = connection.execute(
            text("SELECT count(*) FROM meeting WHERE state NOT IN ('ended', 'failed', 'cancelled')")
        ).scalar_one()
    return int(waiting) == 0


def _store_states(procs: ProcessSystem) -> dict[str, int]:
    """Meetings by state and by the kind of claim they hold (the token's first letter)."""
    try:
        with procs.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT state, substr(claim_token, 1, 1), count(*) FROM meeting GROUP BY 1, 2")
            ).all()
    except Exception as error:  # a figure for the reader, not the run's outcome
        return {"error": 1, type(error).__name__: 1}
    return {f"{state} {claim or '-'}": int(count) for state, claim, count in rows}


def _cpu(procs: ProcessSystem) -> float:
    return sum(tree_total(w.pid, cpu_seconds) or 0.0 for w in procs.workers if w.poll() is None)


def _merged(counts: Iterable[LogCounts]) -> LogCounts:
    total = LogCounts()
    for one in counts:
        for name in ("received", "skipped_duplicate", "skipped_other", "failed", "levels", "dispatched"):
            mine = getattr(total, name)
            for key, value in getattr(one, name).items():
                mine[key] = mine.get(key, 0) + value
        total.dispatch_lines += one.dispatch_lines
        total.ticks_skipped += one.ticks_skipped
    return total


def burst_figures(
    bookings: Sequence[Booked],
    rooms_of: Mapping[str, list[dict[str, Any]]],
    *,
    worker: LogCounts,
    beat: LogCounts,
    lead: float,
    checked_at: datetime,
) -> dict[str, Any]:
    """The figures of one burst, from the sandbox's rooms (by booking) and the processes' logs.

    A room is due `lead` seconds before its meeting's start (its creation) and at its end (its
    deletion: no grace)."""
    late, lags, live_after = [], [], 0
    made = rooms = duplicates = never_deleted = 0
    live_limit = timedelta(seconds=LIVE_AFTER_END_SECONDS)
    for booked in bookings:
        mine = sorted(rooms_of.get(booked.booking_id, []), key=lambda r: r["created_at"])
        if not mine:
            continue
        made += 1
        rooms += len(mine)
        duplicates += len(mine) > 1
        first = parse(mine[0]["created_at"])
        assert first is not None
        late.append((first - (booked.start - timedelta(seconds=lead))).total_seconds())
        for room in mine:
            deleted = parse(room["deleted_at"])
            if deleted is None:
                never_deleted += 1
            else:
                lags.append((deleted - booked.end).total_seconds())
            if (deleted is None and checked_at > booked.end + live_limit) or (
                deleted is not None and deleted > booked.end + live_limit
            ):
                live_after += 1
    n = len(bookings)
    creations = worker.received.get(CREATE_TASK, 0)
    deletions = worker.received.get(DELETE_TASK, 0)
    return {
        "meetings": n,
        "rooms_made": made,
        "rooms": rooms,
        "duplicate_rooms": duplicates,
        "never_made": n - made,
        "creation_vs_due_s": percentiles(late),
        "live_after_end": live_after,
        "live_after_end_s": LIVE_AFTER_END_SECONDS,
        "never_deleted": never_deleted,
        "deletion_lag_s": percentiles(lags),
        "received": dict(worker.received),
        "create_copies_per_row": round(creations / n, 3) if n else None,
        "delete_copies_per_room": round(deletions / rooms, 3) if rooms else None,
        "skipped_duplicate": dict(worker.skipped_duplicate),
        "skipped_other": dict(worker.skipped_other),
        "failed": dict(worker.failed),
        "worker_log_levels": dict(worker.levels),
        "beat_dispatched": dict(beat.dispatched),
        "beat_dispatch_passes": beat.dispatch_lines,
        "beat_ticks_skipped": beat.ticks_skipped,
        "worker_dispatched": dict(worker.dispatched),
        "checked_at": iso(checked_at),
    }


# --------------------------------------------------------------------------------------------
# The benchmark phase: a fresh stack per size, as the Procfile runs it.


def parse_sizes(spec: str, window: float) -> list[tuple[int, float]]:
    """`1000,3000` or `1000/5,3000/3` (a size and its own window, in seconds)."""
    out = []
    for part in spec.split(","):
        if part.strip():
            size, _, own = part.strip().partition("/")
            out.append((int(size.replace("_", "")), float(own) if own else window))
    return out


def one_size(
    n: int,
    window: float,
    *,
    database: str | None = None,
    concurrency: int = 16,
    latency_ms: float = 50.0,
    give_up_s: float | None = None,
    keep: bool = False,
    duration: float | None = None,
) -> dict[str, Any]:
    stack = Stack.start(
        f"burst{n}",  # also a PostgreSQL schema name
        database=database,
        latency_ms=latency_ms,
        settings=settings(concurrency),
    )
    figures: dict[str, Any] = {}
    try:
        figures = run(
            stack.procs, stack.sandbox.admin, n=n, window=window, duration=duration, give_up_s=give_up_s
        )
        figures.update(store=stack.store.label, latency_ms=latency_ms, memory_mib=dict(stack.sample_memory()))
        return figures
    finally:
        stack.stop()
        store_dir = None
        if stack.store.label == "SQLite":
            store_dir = Path(stack.store.url.removeprefix("sqlite:///")).parent
        if keep:
            say(f"  kept: logs in {stack.logs}, store {stack.store.url}")
        else:
            if store_dir is not None:
                shutil.rmtree(store_dir, ignore_errors=True)
            if figures.get("outcome") == "done":
                shutil.rmtree(stack.logs, ignore_errors=True)
            else:
                say(f"  logs kept in {stack.logs}")


def runs(sizes: Sequence[tuple[int, float]], **options: Any) -> dict[str, Any]:
    """One burst per (size, window), each on a fresh stack; `options` as `one_size` takes them."""
    rows = []
    for n, window in sizes:
        row = one_size(n, window, **options)
        rows.append(row)
        say(f"  {row_line(row)}")
    return {"pool": "threads", "processes": 1, "rows": rows}


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """`make bench`'s phase `burst` (bench/run.py)."""
    return runs(
        args.burst_sizes,
        database=args.database,
        concurrency=args.burst_concurrency,
        latency_ms=args.latency,
    )


def _p(p: Mapping[str, Any]) -> str:
    if not p or not p.get("n"):
        return "-"
    return f"{p['p50']:.2f} / {p['p99']:.2f} / {p['max']:.2f}"


HEADER = (
    f"{'burst':<18}{'made':>13}  {'creation vs due s':<26}{'live':>6}  {'deletion lag s':<26}"
    f"{'copies c/d':<15}{'dup skips':>10}{'CPU ms/room':>12}  outcome"
)


def row_line(row: Mapping[str, Any]) -> str:
    skips = sum(row["skipped_duplicate"].values())
    copies = f"{row['create_copies_per_row']} / {row['delete_copies_per_room'] or '-'}"
    made = f"{row['rooms_made']}/{row['meetings']}"
    return (
        f"{row['meetings']:>6} in {row['window_s']:>4g} s  {made:>13}  {_p(row['creation_vs_due_s']):<26}"
        f"{row['live_after_end']:>6}  {_p(row['deletion_lag_s']):<26}{copies:<15}{skips:>10}"
        f"{row['worker_cpu_ms_per_room'] or '-':>12}  {row['outcome']} after {row['watched_s']} s"
    )


def lines(f: Mapping[str, Any]) -> list[str]:
    first = f["rows"][0] if f["rows"] else {}
    out = [
        f"burst (1 worker x {first.get('concurrency', '?')} threads, {first.get('store', '?')}; "
        "read off the sandbox and the worker's log):",
        f"  {HEADER}",
    ]
    out.extend(f"  {row_line(row)}" for row in f["rows"])
    out.append(
        f"  (live: rooms alive {LIVE_AFTER_END_SECONDS:g} s after their end; copies: rooms.create_room"
        " messages received per meeting / rooms.delete_room per room made)"
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.burst",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", default="1000,3000,10000", help="meetings per burst, e.g. 1000/5,3000/3")
    parser.add_argument("--window", type=float, default=3.0, help="seconds over which rooms fall due")
    parser.add_argument("--concurrency", type=int, default=16, help="the worker's threads")
    parser.add_argument(
        "--meeting-seconds", type=float, default=None, help="start to end (default N/40, at least 30)"
    )
    parser.add_argument("--latency", type=float, default=50.0, help="the sandbox's latency, ms")
    parser.add_argument("--database", default=None, help="a postgresql:// server URL; default SQLite")
    parser.add_argument(
        "--give-up", type=float, default=None, help="seconds after the last end (default 60+)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite store")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    say(f"machine: {machine()}; load {os.getloadavg()}")
    figures = runs(
        parse_sizes(args.sizes, args.window),
        database=args.database,
        concurrency=args.concurrency,
        latency_ms=args.latency,
        give_up_s=args.give_up,
        keep=args.keep,
        duration=args.meeting_seconds,
    )
    say("")
    say("\n".join(lines(figures)))
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
