"""Runs the naive recipe (bench/naive.py) as real worker processes, and its visibility-timeout experiment.

`start_naive_workers` starts `celery -A bench.naive worker --pool threads` processes for the main
benchmark. `visibility_experiment` books meetings whose creation ETA lies beyond the Redis
transport's visibility timeout and counts what happens: executions per task (from the tasks' own
counters in Redis) and rooms per booking (from the Whereby sandbox's record).

When kombu's Redis transport puts an unacked message back (QoS.restore_visible): any consumer
re-queues every message in the `unacked` index older than its visibility_timeout, whoever holds
it, once when it starts consuming (on_poll_init) and then on a timer, every
unacked_restore_interval (10 s) x unacked_restore_throttle (10) = about 100 s by default. A worker
that reserved an ETA message keeps it in memory until the ETA, so a restore hands a second copy
to some worker and both run. Two scenarios show it within seconds:

- scale-out: one worker reserves everything, then a second starts after the visibility timeout
  (more capacity, or a deploy's new instance); kombu's restore cadence is left at its defaults.
- steady: a single worker, never restarted, with the periodic sweep scaled down with the timeout
  (unacked_restore_interval=1, throttle 1), as production's 100 s sweep is small against 3600 s.

    .venv/bin/python -m bench.naive_run [--scenario scale-out|steady|both] [--meetings N]
                                        [--visibility-timeout S] [--eta S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench import naive
from config.settings import SANDBOX_API_KEY
from worker.devtools.localredis import EmbeddedRedis
from worker.devtools.sandbox import SandboxAdmin, SandboxConfig, SandboxServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCENARIOS = ("scale-out", "steady")
# kombu's defaults (kombu.transport.redis.Channel): the timer period and the scan throttle.
KOMBU_RESTORE_INTERVAL, KOMBU_RESTORE_THROTTLE = 10, 10
RECEIVED = re.compile(r"Task (naive\.\w+)\[[0-9a-f-]+\] received")


@dataclass
class NaiveWorkers:
    """Worker processes of the naive recipe; `logs` holds one log file per worker."""

    processes: list[subprocess.Popen[bytes]]
    names: list[str]
    logs: Path
    started_at: list[float] = field(default_factory=list)  # time.time() when each answered ping

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def received(self) -> dict[str, dict[str, int]]:
        """Per worker log in `logs`: messages received per task (a redelivered copy counts again)."""
        counts: dict[str, dict[str, int]] = {}
        for path in sorted(self.logs.glob("*.log")):
            mine = counts.setdefault(path.stem, {})
            for match in RECEIVED.finditer(path.read_text(errors="replace")):
                mine[match.group(1)] = mine.get(match.group(1), 0) + 1
        return counts

    def stop(self, timeout: float = 15) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL for a worker that does not exit within `timeout`."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _worker_env(
    redis_url: str, whereby_url: str, concurrency: int, visibility_timeout: int, restore_interval: int | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOMKEEPER_", "WHEREBY_", "NAIVE_"))}
    env.update(
        NAIVE_BROKER_URL=redis_url,
        NAIVE_CONCURRENCY=str(concurrency),
        NAIVE_VISIBILITY_TIMEOUT=str(visibility_timeout),
        WHEREBY_API_URL=whereby_url,
        WHEREBY_API_KEY=SANDBOX_API_KEY,
        PYTHONUNBUFFERED="1",
    )
    if restore_interval is not None:
        env["NAIVE_RESTORE_INTERVAL"] = str(restore_interval)
    return env


def start_naive_workers(
    redis_url: str,
    whereby_url: str,
    concurrency: int = 16,
    visibility_timeout: int = 3600,
    workers: int = 1,
    *,
    restore_interval: int | None = None,
    logs: Path | None = None,
    timeout: float = 30,
) -> NaiveWorkers:
    """Start `workers` naive worker processes and return once each answers a ping.

    `restore_interval` (seconds) sets kombu's unacked_restore_interval with a throttle of 1; None
    keeps kombu's defaults, as a user would. `logs` is a directory to write into (default: a new
    temporary one).
    """
    logs = logs or Path(tempfile.mkdtemp(prefix="roomkeeper-naive-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = _worker_env(redis_url, whereby_url, concurrency, visibility_timeout, restore_interval)
    handle = NaiveWorkers([], [], logs)
    caller = Celery(broker=redis_url)
    try:
        for _ in range(workers):
            name = f"naive-{uuid.uuid4().hex[:8]}"
            with (logs / f"{name}.log").open("ab") as log:
                process = subprocess.Popen(
                    [
                        str(BIN / "celery"),
                        "-A",
                        "bench.naive",
                        "worker",
                        "--pool",
                        "threads",
                        "--concurrency",
                        str(concurrency),
                        "--loglevel",
                        "INFO",
                        "-n",
                        f"{name}@%h",
                        "--without-mingle",
                        "--without-gossip",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            handle.processes.append(process)
            handle.names.append(name)
        waiting = set(handle.names)
        deadline = time.monotonic() + timeout
        while waiting:
            for process, name in zip(handle.processes, handle.names, strict=True):
                if process.poll() is not None:
                    tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"naive worker {name} exited ({process.returncode}): {tail}")
            replies = caller.control.ping(timeout=0.5) or []
            for reply in replies:
                for node in reply:
                    answered = node.split("@", 1)[0]
                    if answered in waiting:
                        waiting.discard(answered)
                        handle.started_at.append(time.time())
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"naive workers {sorted(waiting)} did not answer within {timeout}s")
    except BaseException:
        handle.stop(timeout=5)
        raise
    finally:
        caller.close()
    return handle


def _admin_url(whereby_url: str) -> str:
    base = whereby_url.rstrip("/")
    return (base[: -len("/v1")] if base.endswith("/v1") else base) + "/_sandbox"


def _counts(store: redis.Redis, key: str, bookings: list[str]) -> list[int]:
    return [int(value or 0) for value in store.hmget(key, bookings)]


def visibility_experiment(
    redis_url: str,
    whereby_url: str,
    meetings: int = 20,
    visibility_timeout: int = 5,
    eta_seconds: float = 15,
    *,
    scenario: str = "scale-out",
    admin_url: str | None = None,
    concurrency: int = 16,
    lead_seconds: float = 1.0,
    meeting_seconds: float = 4.0,
    settle_seconds: float = 5.0,
    second_worker_after: float | None = None,
    steady_restore_interval: int | None = 1,
) -> dict[str, Any]:
    """Book `meetings` meetings whose create ETA is `eta_seconds` away, beyond the visibility timeout.

    `redis_url` should be a Redis (database) no other worker uses while this runs: kombu's
    `unacked` index is shared by every queue of a database, and a worker with a lower visibility
    timeout restores other apps' messages too. `whereby_url` is the sandbox's /v1 URL; its record
    is read at `admin_url` (default: the same origin's /_sandbox). See the module docstring for the
    scenarios; in scale-out the second worker is started `second_worker_after` seconds after the
    bookings (default: the visibility timeout + 2 s); in steady kombu's sweep runs every
    `steady_restore_interval` seconds (None: kombu's defaults, about 100 s).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}")
    admin = SandboxAdmin(admin_url or _admin_url(whereby_url))
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    caller = Celery(broker=redis_url, backend=redis_url)
    run = uuid.uuid4().hex[:8]
    bookings = [f"vis-{run}-{i:03d}" for i in range(meetings)]
    restore_interval = steady_restore_interval if scenario == "steady" else None
    handles: list[NaiveWorkers] = []
    extra_started: float | None = None
    try:
        handles.append(
            start_naive_workers(
                redis_url,
                whereby_url,
                concurrency=concurrency,
                visibility_timeout=visibility_timeout,
                restore_interval=restore_interval,
            )
        )
        booked_at = time.time()
        now = datetime.now(UTC)
        create_at = now + timedelta(seconds=eta_seconds)
        start = create_at + timedelta(seconds=lead_seconds)
        end = start + timedelta(seconds=meeting_seconds)
        for booking in bookings:
            naive.book(caller, booking, start, end, lead_seconds)
        if scenario == "scale-out":
            after = visibility_timeout + 2 if second_worker_after is None else second_worker_after
            time.sleep(max(0.0, booked_at + after - time.time()))
            handles.append(
                start_naive_workers(
                    redis_url,
                    whereby_url,
                    concurrency=concurrency,
                    visibility_timeout=visibility_timeout,
                    logs=handles[0].logs,
                )
            )
            extra_started = handles[1].started_at[0] - booked_at
        # Past the last delete's ETA, then until the counters stop moving (bounded).
        time.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds() + settle_seconds))
        keys = [naive.EXECUTIONS_KEY.format(task=t) for t in ("create_room", "delete_room")]
        last: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = [sum(_counts(store, key, bookings)) for key in keys] + [store.llen(naive.QUEUE)]
            if seen == last:
                break
            last = seen
            time.sleep(3)
        by_worker = handles[0].received()  # every worker logs into the first one's directory
        first = by_worker.get(handles[0].names[0], {})
        received = {task: sum(w.get(task, 0) for w in by_worker.values()) for task in naive.TASKS}
        logs = handles[0].logs
    finally:
        for handle in handles:
            handle.stop()
        caller.close()

    creates = _counts(store, naive.EXECUTIONS_KEY.format(task="create_room"), bookings)
    create_retries = _counts(store, naive.RETRIES_KEY.format(task="create_room"), bookings)
    deletes = _counts(store, naive.EXECUTIONS_KEY.format(task="delete_room"), bookings)
    delete_retries = _counts(store, naive.RETRIES_KEY.format(task="delete_room"), bookings)
    store.close()
    prefixes = {"/" + naive.room_prefix(booking): booking for booking in bookings}
    rooms: dict[str, list[dict[str, Any]]] = {booking: [] for booking in bookings}
    for room in admin.rooms(include_deleted=True):
        name = room.get("room_name") or ""
        for prefix, booking in prefixes.items():
            if name.startswith(prefix):
                rooms[booking].append(room)
    duplicate_creates = sum(max(0, n - 1 - r) for n, r in zip(creates, create_retries, strict=True))
    duplicate_deletes = sum(max(0, n - 1 - r) for n, r in zip(deletes, delete_retries, strict=True))
    made = sum(len(found) for found in rooms.values())
    left_live = sum(1 for found in rooms.values() for room in found if room["live"])
    duplicated = sum(1 for found in rooms.values() if len(found) > 1)
    sweep = (
        f"kombu's default restore cadence (a sweep when a consumer starts, then every "
        f"{KOMBU_RESTORE_INTERVAL} s x throttle {KOMBU_RESTORE_THROTTLE} = ~"
        f"{KOMBU_RESTORE_INTERVAL * KOMBU_RESTORE_THROTTLE} s)"
        if restore_interval is None
        else f"kombu's periodic sweep scaled to every {restore_interval} s (unacked_restore_interval="
        f"{restore_interval}, unacked_restore_throttle=1)"
    )
    if scenario == "scale-out":
        how = (
            f"One naive worker (visibility_timeout {visibility_timeout} s; {sweep}) reserved all "
            f"{2 * meetings} ETA messages when they were sent. A second worker answered "
            f"{extra_started:.1f} s after the bookings (more capacity, or a deploy's new instance); its "
            f"start-up sweep (QoS.restore_visible from on_poll_init) re-queued every message unacked for "
            f"longer than the timeout although the first worker still held it in memory, and both "
            f"copies ran at the ETA. Workers received {received[naive.CREATE_TASK]} create and "
            f"{received[naive.DELETE_TASK]} delete messages for {meetings} meetings, "
            f"{sum(first.values())} of them by the first worker, "
            f"{sum(received.values()) - sum(first.values())} by the new one."
        )
    else:
        how = (
            f"A single naive worker, never restarted (visibility_timeout {visibility_timeout} s; "
            f"{sweep}) reserved all {2 * meetings} ETA messages; every sweep re-queued those unacked "
            f"for longer than the timeout (a redelivered copy is unacked again from its redelivery), and "
            f"the same worker reserved each copy beside the ones it still held; all ran at the ETA. It "
            f"received {received[naive.CREATE_TASK]} "
            f"create and {received[naive.DELETE_TASK]} delete messages for {meetings} meetings."
        )
    how += (
        f" delete_room deletes only the room id stored last in {naive.ROOMS_KEY}, so {left_live} "
        f"room(s) stayed live after every delete ran, left to Whereby's own clean-up after their endDate."
    )
    return {
        "scenario": scenario,
        "visibility_timeout_s": visibility_timeout,
        "eta_s": eta_seconds,
        "meetings": meetings,
        "workers": sum(len(handle.processes) for handle in handles),
        "second_worker_started_after_s": None if extra_started is None else round(extra_started, 1),
        "restore_sweep": sweep,
        "create_messages_received": received[naive.CREATE_TASK],
        "delete_messages_received": received[naive.DELETE_TASK],
        "messages_received_by_worker": {name: sum(tasks.values()) for name, tasks in by_worker.items()},
        "create_executions": sum(creates),
        "create_retries": sum(create_retries),
        "duplicate_create_executions": duplicate_creates,
        "delete_executions": sum(deletes),
        "duplicate_delete_executions": duplicate_deletes,
        "rooms_created": made,
        "duplicate_rooms": duplicated,
        "bookings_without_room": sum(1 for found in rooms.values() if not found),
        "rooms_left_live": left_live,
        "how": how,
        "logs": str(logs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_run", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument("--meetings", type=int, default=20)
    parser.add_argument("--visibility-timeout", type=int, default=5)
    parser.add_argument("--eta", type=float, default=15)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    server = SandboxServer(SandboxConfig(latency_ms=50)).start()
    results = []
    try:
        for scenario in scenarios:
            # A Redis of its own per scenario: nothing left from one can be restored into the next.
            broker = EmbeddedRedis().start()
            try:
                results.append(
                    visibility_experiment(
                        broker.url,
                        server.url,
                        meetings=args.meetings,
                        visibility_timeout=args.visibility_timeout,
                        eta_seconds=args.eta,
                        scenario=scenario,
                        admin_url=server.admin_url,
                    )
                )
            finally:
                broker.stop()
            print(json.dumps(results[-1], indent=2), flush=True)
    finally:
        server.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
