"""`make chaos`: a soak run of the service as real processes under faults, then an audit.

Not part of CI. The Whereby sandbox runs in this process (budget 1000 points a minute, the same as
the service's own ROOMKEEPER_API_POINTS_PER_MINUTE); Redis, two workers and one beat run as
processes (worker.devtools.harness.ProcessSystem) on SQLite, or PostgreSQL with --database. A few hundred
short meetings are booked, rescheduled and cancelled through the contract (tasks sent by name),
while at random: the sandbox's faults change (5xx, lost replies on create, latency), live rooms
are deleted behind the service's back, "another app" spends the shared budget, 429 storms are
scripted, workers are SIGKILLed (two always run) and Redis restarts. Then the faults stop, the run
waits (bounded) for every meeting to settle, and audits the sandbox's own record of rooms and
calls against the store.

    .venv/bin/python -m bench.chaos [--quick] [--seed N] [--meetings N] [--minutes M]
                                    [--database postgresql://…] [--json var/chaos.json]

Exits 1 when a meeting had a duplicate room, a room is still live after the run, or a room was
deleted late for any reason but Whereby's own 429s (DUPLICATE_RULE, LEAK_RULE): a deletion that
Whereby refused during a 429 storm or another app's overspend is reported, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlmodel import Session, col, select

from bench.common import percentiles, postgres_schema
from worker import store
from worker.devtools.harness import ProcessSystem, parse
from worker.devtools.sandbox import SandboxConfig, SandboxServer
from worker.store import deployment
from worker.store.models import History, Meeting, Room

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 1000  # points a minute: the sandbox's budget and the service's own limiter alike
TERMINAL = ("ended", "cancelled", "failed")
CALL_TIMEOUT = 6.0  # seconds a caller waits for one reply before sending again
CALL_TRIES = 4
RESTARTS = {"restart_redis", "kill_worker", "worker_exited", "beat_exited"}
SHOWN_LEAKS, SHOWN_HISTORIES = 20, 4  # printed; the JSON report has them all
LANES = 6  # caller threads; each booking's calls go through one lane, in order
DUPLICATE_RULE = (
    "a booking has a duplicate when more of its rooms were live at one instant than it may have: 1, "
    "or 2 when a reschedule to a later end replaced its room (the new room is made before the old "
    "one is deleted, CONTRACT §2.1); and two rooms with the same endDate (made for the same "
    "schedule) must never be live at once, replaced or not"
)
LEAK_RULE = (
    "a room leaks when it is still live after the run, or was deleted more than {grace:g} s after it "
    "should have gone: the earliest of its own endDate, its meeting's final end and the meeting's "
    "cancellation, but not before the room was made"
)
# (plan, weight): plain books once; keep shortens the meeting while its room is live (the room
# stays); replace moves the end later while the room is live (a new room); move shifts the whole
# meeting later before its room exists; cancel cancels before or during the meeting.
KINDS = (("plain", 55), ("keep", 12), ("replace", 12), ("move", 5), ("cancel", 12), ("replace+cancel", 4))


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


def live_at_once(rooms: list[dict[str, Any]], until: datetime) -> tuple[int, float]:
    """(most of these rooms live at one instant, seconds during which more than one was live).

    As in Audit.max_live_at_once, a deletion and a creation at the same instant do not overlap."""
    moments: list[tuple[datetime, int]] = []
    for room in rooms:
        created = parse(room["created_at"])
        assert created is not None
        moments.append((created, 1))
        deleted = parse(room["deleted_at"])
        moments.append((deleted or until, -1))
    live = peak = 0
    overlap, since = 0.0, until
    for moment, step in sorted(moments):
        if live > 1:
            overlap += (moment - since).total_seconds()
        since = moment
        live += step
        peak = max(peak, live)
    return peak, overlap


# --------------------------------------------------------------------------------------------
# The plan: bookings and the caller's actions on them.


@dataclass
class Booking:
    booking_id: str
    kind: str
    start: datetime
    end: datetime
    replace_sent: bool = False  # a reschedule that may replace the room was sent
    last_accepted: str | None = None  # "schedule" or "cancel": the last call that got a reply
    accepted_end: datetime | None = None
    calls: list[str] = field(default_factory=list)


@dataclass
class Action:
    at: float  # seconds after the run's start
    booking: Booking
    op: str  # book | keep | replace | move | cancel
    amount: float = 0.0  # seconds: how much to shorten, extend or shift


@dataclass
class Profile:
    meetings: int
    minutes: float
    lengths: tuple[float, float]
    extend: tuple[float, float]
    settle: float  # seconds allowed after the last meeting's end for everything to settle
    redis_restarts: int
    other_app: float = 300  # points a minute "another app" of the organisation spends, on average


def make_plan(profile: Profile, rng: random.Random, t0: datetime) -> tuple[list[Booking], list[Action]]:
    window = profile.minutes * 60
    kinds, weights = zip(*KINDS, strict=True)
    bookings, actions = [], []
    for i in range(profile.meetings):
        start_at = rng.uniform(4, window)
        length = rng.uniform(*profile.lengths)
        book_at = max(0.5, start_at - rng.uniform(2, 15))
        kind = rng.choices(kinds, weights)[0]
        booking = Booking(
            f"chaos-{i:04d}",
            kind,
            t0 + timedelta(seconds=start_at),
            t0 + timedelta(seconds=start_at + length),
        )
        bookings.append(booking)
        actions.append(Action(book_at, booking, "book"))
        during = start_at + rng.uniform(1.5, max(2.0, length * 0.5))  # the room should be live by then
        if kind == "keep":
            actions.append(Action(during, booking, "keep", rng.uniform(0.2, 0.4) * length))
        elif kind in ("replace", "replace+cancel"):
            actions.append(Action(during, booking, "replace", rng.uniform(*profile.extend)))
            if kind == "replace+cancel":
                actions.append(Action(during + rng.uniform(1, 4), booking, "cancel"))
        elif kind == "move":
            at = book_at + rng.uniform(0.2, max(0.3, start_at - book_at - 3))
            actions.append(Action(at, booking, "move", rng.uniform(3, 10)))
        elif kind == "cancel":
            if rng.random() < 0.5:
                at = rng.uniform(book_at + 0.3, max(book_at + 0.4, start_at - 0.5))
            else:
                at = start_at + rng.uniform(1, length * 0.8)
            actions.append(Action(at, booking, "cancel"))
    actions.sort(key=lambda a: a.at)
    return bookings, actions


# --------------------------------------------------------------------------------------------
# The caller: lanes of threads sending the contract's tasks by name, each with a Celery of its own.


class Lane:
    """One caller thread's own Celery app (result consumers are not shared between threads)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.app = Celery(broker=broker, backend=broker)

    def renew(self) -> None:
        with contextlib.suppress(Exception):
            self.app.close()
        self.app = Celery(broker=self.broker, backend=self.broker)


class Caller:
    def __init__(self, broker: str, t0: float, stop: threading.Event) -> None:
        self.broker = broker
        self.t0 = t0
        self.stop = stop
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.lateness: list[float] = []
        self.threads: list[threading.Thread] = []

    def start(self, actions: list[Action], lanes: int) -> None:
        index: dict[str, int] = {}
        for action in actions:
            index.setdefault(action.booking.booking_id, len(index))
        for lane in range(lanes):
            mine = [a for a in actions if index[a.booking.booking_id] % lanes == lane]
            thread = threading.Thread(target=self._run, args=(mine,), name=f"caller-{lane}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def busy(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def _run(self, actions: list[Action]) -> None:
        lane = Lane(self.broker)
        try:
            for action in actions:
                delay = self.t0 + action.at - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
                with self.lock:
                    self.lateness.append(max(0.0, -delay))
                self._act(lane, action)
        finally:
            lane.app.close()

    def _send(self, lane: Lane, task: str, until: datetime | None, **kwargs: Any) -> tuple[Any, str]:
        last = ""
        for attempt in range(CALL_TRIES):
            if until is not None and utcnow() > until - timedelta(seconds=1):
                return None, f"gave up, too late ({last or 'not sent'})"
            if attempt:
                with self.lock:
                    self.stats["resent"] += 1
            try:
                view = lane.app.send_task(task, queue="rooms", kwargs=kwargs).get(timeout=CALL_TIMEOUT)
                return view, ""
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"[:200]
                if type(exc).__name__ in ("InvalidRequest", "UnknownBooking"):
                    return None, last  # the service's answer, not a lost message
                if "must be restarted" in str(exc):  # Celery's result consumer gave up on Redis
                    lane.renew()
                    with self.lock:
                        self.stats["caller app renewed"] += 1
                time.sleep(0.5)
        return None, last

    def _act(self, lane: Lane, action: Action) -> None:
        booking, op, now = action.booking, action.op, utcnow()
        start, end = booking.start, booking.end
        if op == "keep":
            end = max(booking.end - timedelta(seconds=action.amount), now + timedelta(seconds=3))
            if end >= booking.end - timedelta(seconds=0.5):
                self._note(booking, "keep skipped: too close to the end", "skipped")
                return
        elif op == "replace":
            end = booking.end + timedelta(seconds=action.amount)
        elif op == "move":
            start += timedelta(seconds=action.amount)
            end += timedelta(seconds=action.amount)
        if op == "cancel":
            view, error = self._send(lane, "rooms.cancel_meeting", None, booking_id=booking.booking_id)
        else:
            if op in ("replace", "move"):
                booking.replace_sent = True
            booking.start, booking.end = start, end
            view, error = self._send(
                lane,
                "rooms.schedule_meeting",
                end,
                booking_id=booking.booking_id,
                start=start.isoformat(),
                end=end.isoformat(),
                room={"room_name_prefix": "chaos", "room_mode": "group", "fields": ["hostRoomUrl"]},
                metadata={"plan": booking.kind, "op": op},
            )
        if view is not None:
            booking.last_accepted = "cancel" if op == "cancel" else "schedule"
            booking.accepted_end = None if op == "cancel" else end
            self._note(booking, f"{op} ok at {iso(utcnow())}: state {view.get('state')}", f"{op} ok")
        else:
            self._note(booking, f"{op} FAILED at {iso(utcnow())}: {error}", f"{op} failed")

    def _note(self, booking: Booking, line: str, stat: str) -> None:
        booking.calls.append(line)
        with self.lock:
            self.stats[stat] += 1


# --------------------------------------------------------------------------------------------
# Chaos: faults, out-of-band deletions, another app's spending, 429 storms, kills, Redis restarts.


class Chaos(threading.Thread):
    def __init__(self, procs: ProcessSystem, profile: Profile, rng: random.Random, t0: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.procs = procs
        self.admin = procs.admin
        self.rng = rng
        self.t0 = t0
        self.window = profile.minutes * 60
        self.stopped = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.other_app = profile.other_app
        self.spends: list[tuple[str, int]] = []  # (when, points): another app's spending
        self.last_spend = t0
        self.plan = self._plan(profile)

    def _plan(self, profile: Profile) -> list[tuple[float, str]]:
        plan: list[tuple[float, str]] = []
        for kind, first, gap in (
            ("faults", (2, 4), (8, 20)),
            ("delete_out_of_band", (6, 12), (4, 12)),
            ("spend", (5, 10), (10, 20)),
            ("storm", (15, 30), (30, 60)),
            ("kill_worker", (8, 15), (15, 35)),
        ):
            at = self.rng.uniform(*first)
            while at < self.window:
                plan.append((at, kind))
                at += self.rng.uniform(*gap)
        for n in range(profile.redis_restarts):
            share = (n + 1) / (profile.redis_restarts + 1)
            plan.append((self.window * self.rng.uniform(share - 0.1, share + 0.1), "restart_redis"))
        return sorted(plan)

    def log(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.events.append(
            {"t": round(time.monotonic() - self.t0, 1), "at": iso(utcnow()), "kind": kind, "detail": detail}
        )

    def run(self) -> None:
        for at, kind in self.plan:
            while not self.stopped.is_set():
                wait = self.t0 + at - time.monotonic()
                if wait <= 0:
                    break
                self.stopped.wait(min(wait, 1.0))
                self.keep_processes()
            if self.stopped.is_set():
                return
            try:
                getattr(self, kind)()
            except Exception as exc:
                self.log("chaos_error", f"{kind}: {type(exc).__name__}: {exc}"[:300])
        while not self.stopped.wait(1.0):
            self.keep_processes()

    def keep_processes(self) -> None:
        """Two workers and one beat: one that died by itself is logged, then replaced."""
        procs = self.procs
        for process in procs.workers:
            if process.poll() is not None and not getattr(process, "chaos_seen", False):
                process.chaos_seen = True  # type: ignore[attr-defined]
                if process.returncode != -signal.SIGKILL:
                    self.log(
                        "worker_exited", f"pid {process.pid} exited by itself, status {process.returncode}"
                    )
        while sum(p.poll() is None for p in procs.workers) < 2:
            try:
                procs.start_worker()
            except Exception as exc:
                self.log("chaos_error", f"starting a worker: {type(exc).__name__}: {exc}")
                return
        for beat in procs.beats:
            if beat.poll() is not None and not getattr(beat, "chaos_seen", False):
                beat.chaos_seen = True  # type: ignore[attr-defined]
                self.log("beat_exited", f"pid {beat.pid} exited by itself, status {beat.returncode}")
        if not any(beat.poll() is None for beat in procs.beats):
            procs.start_beat()

    def faults(self) -> None:
        rng = self.rng
        settings = {
            "error_rate": round(rng.uniform(0.1, 0.3), 2) if rng.random() < 0.6 else 0.0,
            "lost_reply_rate": round(rng.uniform(0.1, 0.2), 2) if rng.random() < 0.6 else 0.0,
            "lost_reply_mode": "error" if rng.random() < 0.7 else "stall",
            "latency_ms": round(rng.uniform(0, 800)) if rng.random() < 0.7 else 0,
        }
        self.admin.set_faults(**settings)
        self.log("faults", ", ".join(f"{k}={v}" for k, v in settings.items()))

    def delete_out_of_band(self) -> None:
        live = [
            r for r in self.admin.rooms(include_deleted=False) if (r["room_name"] or "").startswith("/rk-")
        ]
        if not live:
            return
        room = self.rng.choice(live)
        self.admin.delete_out_of_band(room["meeting_id"])
        self.log("delete_out_of_band", f"room {room['meeting_id']} {room['room_name']}")

    def spend(self) -> None:
        """Lumps that average --other-app points a minute: the service's own limiter never sees them."""
        elapsed, self.last_spend = time.monotonic() - self.last_spend, time.monotonic()
        points = round(self.other_app * elapsed / 60 * self.rng.uniform(0.5, 1.5))
        if points < 1:
            return
        self.admin.spend(points)
        self.spends.append((iso(utcnow()) or "", points))
        self.counts["points_spent_by_another_app"] += points
        self.log("spend", f"another app spent {points} points")

    def storm(self) -> None:
        count, retry_after = self.rng.randint(2, 5), round(self.rng.uniform(1, 2), 1)
        self.admin.script(*[{"method": "*", "action": "rate_limit", "retry_after": retry_after}] * count)
        self.log("storm", f"{count} scripted 429s, Retry-After {retry_after}s")

    def kill_worker(self) -> None:
        alive = [p for p in self.procs.workers if p.poll() is None]
        if not alive:
            return
        victim = self.rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        victim.chaos_seen = True  # type: ignore[attr-defined]
        self.log("kill_worker", f"SIGKILL worker pid {victim.pid}")
        self.keep_processes()

    def restart_redis(self) -> None:
        down = round(self.rng.uniform(0.5, 2.0), 1)
        self.log("restart_redis", f"Redis down for {down}s (every message lost)")
        self.procs.restart_redis(down_for=down)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)


# --------------------------------------------------------------------------------------------
# The audit.


def peak_window(calls: list[dict[str, Any]], spends: list[tuple[str, int]]) -> dict[str, int]:
    """The most points the organisation spent in any 60 s (the sandbox's window), and whose they were."""
    spent = [(parse(c["at"]), c["points"], 0) for c in calls if c["points"]]
    spent += [(parse(at), 0, points) for at, points in spends]
    ordered = sorted((moment, ours, theirs) for moment, ours, theirs in spent if moment is not None)
    best = {"total": 0, "service": 0, "other_app": 0}
    first = ours = theirs = 0
    for moment, mine, other in ordered:
        ours, theirs = ours + mine, theirs + other
        while ordered[first][0] <= moment - timedelta(seconds=60):
            ours, theirs = ours - ordered[first][1], theirs - ordered[first][2]
            first += 1
        if ours + theirs > best["total"]:
            best = {"total": ours + theirs, "service": ours, "other_app": theirs}
    return best


def tag_of(room_name: str | None) -> str:
    """The attempt tag in a room name of ours ("/rk-<identity>-<tag>-…"), or "" for another's."""
    name = deployment.parse(room_name or "", "rk")
    return name.tag if name is not None else ""


def history_of(procs: ProcessSystem, booking_id: str) -> list[str]:
    with Session(procs.engine) as session:
        rows = session.exec(
            select(History).where(History.booking_id == booking_id).order_by(col(History.id))
        ).all()
        return [f"{iso(h.at)} {h.kind:7} {h.action} {h.outcome}".rstrip() for h in rows]


def summarise(message: str) -> str:
    message = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z?", "<time>", message)
    message = re.sub(r"\b[0-9a-f]{8,}\b", "<id>", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


def scan_logs(procs: ProcessSystem) -> dict[str, Any]:
    found: Counter[str] = Counter()
    tracebacks = 0
    for path in sorted(procs.logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                tracebacks += 1
            match = re.search(r"(ERROR|CRITICAL)/[^\]]*\]\s*(.*)", line)
            if match:
                found[f"{path.stem.rstrip('0123456789')}: {summarise(match.group(2))}"] += 1
    return {
        "dir": str(procs.logs),
        "tracebacks": tracebacks,
        "errors": sum(found.values()),
        "top": dict(found.most_common(8)),
    }


HELD_BY_429 = "its deletion waited out 429 pauses (budget or storm)"


def _held_by_whereby(leak: dict[str, Any]) -> bool:
    return leak["why"] == "deleted late" and HELD_BY_429 in leak["causes"]


def audit(
    procs: ProcessSystem,
    bookings: list[Booking],
    chaos: Chaos,
    caller: Caller,
    deadline_hit: bool,
    grace: timedelta,
) -> dict[str, Any]:
    sandbox_audit = procs.audit()
    calls = procs.admin.calls()
    planned = {b.booking_id: b for b in bookings}
    with Session(procs.engine) as session:
        meetings = {m.booking_id: m for m in session.exec(select(Meeting)).all()}
        rooms_db = list(session.exec(select(Room)).all())
        cancels = session.exec(
            select(History)
            .where(History.kind == "state", col(History.action).like("%-> cancelled"))
            .order_by(col(History.id))
        ).all()
    by_pk = {m.id: m for m in meetings.values()}
    owner_of_tag = {r.tag: by_pk[r.meeting_pk].booking_id for r in rooms_db}
    replaced_in_store = {by_pk[r.meeting_pk].booking_id for r in rooms_db if r.retired_reason == "replaced"}
    room_of = {r.whereby_id: r for r in rooms_db if r.whereby_id}
    cancelled_at = {h.booking_id: h.at for h in cancels}  # the last cancellation of each booking
    states = Counter(m.state for m in meetings.values())
    now = utcnow()

    duplicates, leaks, lags, ready_late, overlaps, oob_final = [], [], [], [], [], 0
    histories: dict[str, list[str]] = {}
    for booking_id, meeting in sorted(meetings.items()):
        rooms = sorted(sandbox_audit.rooms.get(booking_id, []), key=lambda r: r["created_at"])
        replaced = booking_id in replaced_in_store or (
            booking_id in planned and planned[booking_id].replace_sent
        )
        allowed = 2 if replaced else 1
        peak = sandbox_audit.max_live_at_once(booking_id)
        by_end: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for room in rooms:
            by_end[room["end_date"]].append(room)
        same_end = max((live_at_once(group, now)[0] for group in by_end.values()), default=0)
        overlap = live_at_once(rooms, now)[1]
        if overlap > 0:
            overlaps.append(overlap)
        if peak > allowed or same_end > 1:
            duplicates.append(
                {
                    "booking_id": booking_id,
                    "peak_live": peak,
                    "allowed": allowed,
                    "same_endDate_peak": same_end,
                    "seconds_with_two_or_more_live": round(overlap, 2),
                }
            )
        cancel = cancelled_at.get(booking_id) if meeting.state == "cancelled" else None
        for room in rooms:
            created = parse(room["created_at"])
            end_date = parse(room["end_date"])
            deleted = parse(room["deleted_at"])
            assert created is not None and end_date is not None
            due = min(d for d in (end_date, meeting.room_end, cancel) if d is not None)
            due = max(due, created)
            if room["live"] or (deleted is not None and deleted > due + grace):
                gone = deleted or now
                row = room_of.get(room["meeting_id"])
                if booking_id not in histories:
                    histories[booking_id] = history_of(procs, booking_id)
                nearby = [
                    e for e in chaos.events if due - timedelta(seconds=5) <= (parse(e["at"]) or now) <= gone
                ]
                causes = []
                if (
                    meeting.state == "cancelled"
                    and row is not None
                    and row.retired_reason == "replaced"
                    and gone >= end_date - timedelta(seconds=0.5)
                ):
                    causes.append("cancelled mid-replacement: the old room was left to its own endDate")
                if any(
                    due - timedelta(seconds=1) <= (parse(line.split(" ", 1)[0]) or now) <= gone
                    and any(mark in line for mark in ("429", "BudgetExhausted", "RateLimitedError"))
                    for line in histories[booking_id]
                ):
                    causes.append(HELD_BY_429)
                restarts = sorted({e["kind"] for e in nearby} & RESTARTS)
                if restarts:
                    causes.append("processes or Redis restarted meanwhile: " + ", ".join(restarts))
                leaks.append(
                    {
                        "booking_id": booking_id,
                        "meeting_state": meeting.state,
                        "room": room["meeting_id"],
                        "why": "still live" if room["live"] else "deleted late",
                        "should_be_gone_at": iso(due),
                        "late_by_s": round((gone - due).total_seconds(), 1),
                        "deleted_by": room["deleted_by"],
                        "causes": causes or ["unexplained"],
                        "store": {
                            "state": row.state if row else None,
                            "retired_reason": row.retired_reason if row else None,
                            "is_current_room": bool(row and row.id == meeting.room_id),
                        },
                        "delete_replies": [
                            c["status"]
                            for c in calls
                            if c["method"] == "DELETE" and c["meeting_id"] == room["meeting_id"]
                        ],
                        "chaos_nearby": [f"{e['at']} {e['kind']} {e['detail']}" for e in nearby],
                    }
                )
        if meeting.state == "ended" and rooms:
            final = rooms[-1]
            if final["deleted_by"] == "api":
                lags.append((parse(final["deleted_at"]) - meeting.room_end).total_seconds())  # type: ignore[operator]
            else:
                oob_final += 1
            ready_late.append((parse(rooms[0]["created_at"]) - meeting.start).total_seconds())  # type: ignore[operator]

    failed = {b: m.last_error or "" for b, m in meetings.items() if m.state == "failed"}
    lost = {b: m.state for b, m in meetings.items() if m.state not in TERMINAL}
    never_stored = [b.booking_id for b in bookings if b.booking_id not in meetings and b.last_accepted]
    out_of_step = []
    for b in bookings:
        stored = meetings.get(b.booking_id)
        if stored is None or b.last_accepted is None:
            continue
        if b.last_accepted == "cancel" and stored.state != "cancelled":
            out_of_step.append(f"{b.booking_id}: cancel accepted, store says {stored.state}")
        if b.accepted_end is not None and abs((stored.end - b.accepted_end).total_seconds()) > 0.01:
            out_of_step.append(
                f"{b.booking_id}: end {iso(b.accepted_end)} accepted, store has {iso(stored.end)}"
            )

    points: Counter[str] = Counter()
    per_booking: Counter[str] = Counter()
    for call in calls:
        points[call["method"]] += call["points"]
        owner = owner_of_tag.get(tag_of(call["room_name"]))
        if owner is not None:
            per_booking[owner] += call["points"]
    total_points = sum(points.values())
    faults = Counter((c["fault"] or "").split(":")[0] for c in calls if c["fault"])
    all_rooms = [r for rs in sandbox_audit.rooms.values() for r in rs] + sandbox_audit.strangers
    n = max(1, len(meetings))
    problems = sorted({str(d["booking_id"]) for d in duplicates} | {str(x["booking_id"]) for x in leaks})
    return {
        "meetings": len(meetings),
        "planned": Counter(b.kind for b in bookings),
        "final_states": dict(states),
        "rooms_created": len(all_rooms),
        "rooms_deleted_out_of_band": sum(r["deleted_by"] == "out_of_band" for r in all_rooms),
        "strangers": {
            "total": len(sandbox_audit.strangers),
            "live": [r["meeting_id"] for r in sandbox_audit.strangers if r["live"]],
        },
        "duplicates": {"count": len(duplicates), "rule": DUPLICATE_RULE, "bookings": duplicates},
        "leaks": {
            "count": len(leaks),
            "still_live": sum(leak["why"] == "still live" for leak in leaks),
            "deleted_late": sum(leak["why"] == "deleted late" for leak in leaks),
            # Late only while Whereby itself refused calls (a 429 storm, another app's overspend):
            # reported, but not the service's failure. Everything else fails the run.
            "late_while_whereby_refused": sum(_held_by_whereby(leak) for leak in leaks),
            "ours": sum(not _held_by_whereby(leak) for leak in leaks),
            "by_cause": dict(Counter(c for leak in leaks for c in leak["causes"]).most_common()),
            "grace_s": grace.total_seconds(),
            "rule": LEAK_RULE.format(grace=grace.total_seconds()),
            "rooms": leaks,
        },
        "failed": {
            "count": len(failed),
            "reasons": dict(Counter(summarise(e) for e in failed.values()).most_common()),
            "bookings": failed,
        },
        "lost": {"count": len(lost) + len(never_stored), "not_terminal": lost, "never_stored": never_stored},
        "deadline_hit": deadline_hit,
        "out_of_step_with_caller": out_of_step,
        "replacement_overlap_s": percentiles(overlaps),
        "deletion_lag_s": {**percentiles(lags), "final_room_deleted_out_of_band": oob_final},
        "room_ready_vs_start_s": {
            **percentiles(ready_late),
            "after_start": sum(x > 0 for x in ready_late),
        },
        "sandbox": {
            "calls": len(calls),
            "status_429": sum(c["status"] == 429 for c in calls),
            "status_429_scripted": sum(c["status"] == 429 and c["fault"] == "rate_limit" for c in calls),
            "status_5xx_injected": faults["error"],
            "lost_replies": faults["lost_reply"],
            "points_total": total_points,
            "points_by_method": {"POST": points["POST"], "DELETE": points["DELETE"], "GET": points["GET"]},
            "points_per_meeting": round(total_points / n, 2),
            "points_per_meeting_attributable": round(sum(per_booking.values()) / n, 2),
            "points_shared": total_points - sum(per_booking.values()),
            "points_spent_by_another_app": chaos.counts["points_spent_by_another_app"],
            "peak_points_in_60s": peak_window(calls, chaos.spends),
        },
        "caller": {
            **dict(caller.stats),
            "max_action_lateness_s": round(max(caller.lateness, default=0.0), 1),
        },
        "chaos": {
            "counts": {k: v for k, v in chaos.counts.items() if k != "points_spent_by_another_app"},
            "events": chaos.events,
        },
        "logs": scan_logs(procs),
        "sandbox_calls": calls,
        "other_app_spends": chaos.spends,
        "problem_bookings": {
            b: {
                "plan": planned[b].kind if b in planned else None,
                "caller": planned[b].calls if b in planned else [],
                "rooms": sandbox_audit.rooms.get(b, []),
                "calls": [c for c in calls if owner_of_tag.get(tag_of(c["room_name"])) == b],
                "history": histories.get(b) or history_of(procs, b),
            }
            for b in problems
        },
    }


# --------------------------------------------------------------------------------------------
# The report.


def fmt_lag(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "n/a"
    figures = " / ".join(f"{p[k]:.2f}" for k in ("p50", "p95", "p99", "max"))
    return f"{figures} s  (n={p['n']}, min {p['min']:.2f})"


def print_report(report: dict[str, Any]) -> None:
    run, sb, lk = report["run"], report["sandbox"], report["leaks"]
    states = " · ".join(f"{k} {v}" for k, v in sorted(report["final_states"].items()))
    reasons = "; ".join(f"{v}x {k}" for k, v in report["failed"]["reasons"].items())
    chaos = ", ".join(f"{k} {v}" for k, v in sorted(report["chaos"]["counts"].items()))
    caller = ", ".join(f"{k} {v}" for k, v in sorted(report["caller"].items()))
    rows = [
        (
            "run",
            f"seed {run['seed']}, {run['database']}, {run['minutes']} min window, took {run['took_s']} s",
        ),
        ("meetings", f"{report['meetings']} ({', '.join(f'{k} {v}' for k, v in report['planned'].items())})"),
        ("final states", states),
        (
            "rooms created",
            f"{report['rooms_created']} ({report['rooms_deleted_out_of_band']} deleted out of band)",
        ),
        ("duplicates", str(report["duplicates"]["count"])),
        (
            "leaks",
            f"{lk['count']} (still live {lk['still_live']}, "
            f"deleted >{lk['grace_s']:g} s late {lk['deleted_late']}, of which "
            f"{lk['late_while_whereby_refused']} while Whereby answered 429s); failing the run: {lk['ours']}",
        ),
        ("stranger rooms", f"{report['strangers']['total']} (live {len(report['strangers']['live'])})"),
        ("failed meetings", f"{report['failed']['count']}" + (f": {reasons}" if reasons else "")),
        (
            "meetings lost",
            f"{report['lost']['count']}" + (" (deadline hit)" if report["deadline_hit"] else ""),
        ),
        ("deletion lag p50/p95/p99/max", fmt_lag(report["deletion_lag_s"])),
        ("replacement overlaps", fmt_lag(report["replacement_overlap_s"])),
        ("room made vs start", fmt_lag(report["room_ready_vs_start_s"])),
        (
            "429s from the sandbox",
            f"{sb['status_429']} ({sb['status_429_scripted']} of them scripted storms)",
        ),
        (
            "budget use",
            f"peak {sb['peak_points_in_60s']['total']}/{run['points_per_minute']} points in 60 s (service "
            f"{sb['peak_points_in_60s']['service']}, another app {sb['peak_points_in_60s']['other_app']}; "
            f"it spent {sb['points_spent_by_another_app']} in all, ~{run['other_app_per_minute']:g}/min)",
        ),
        ("5xx injected / lost replies", f"{sb['status_5xx_injected']} / {sb['lost_replies']}"),
        (
            "points per meeting",
            f"{sb['points_per_meeting']} ({sb['points_per_meeting_attributable']} on its own rooms; "
            f"total {sb['points_total']}: POST {sb['points_by_method']['POST']}, DELETE "
            f"{sb['points_by_method']['DELETE']}, GET {sb['points_by_method']['GET']})",
        ),
        ("chaos", chaos),
        ("caller", caller),
        (
            "service logs",
            f"{report['logs']['errors']} ERROR lines, {report['logs']['tracebacks']} tracebacks",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print("\nroomkeeper chaos report")
    print("-" * 100)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * 100)
    print(f"duplicates: {DUPLICATE_RULE}.")
    print(f"leaks: {lk['rule']}.")
    for line, count in report["logs"]["top"].items():
        print(f"  log {count:4}x {line}")
    for item in report["out_of_step_with_caller"]:
        print(f"  OUT OF STEP {item}")
    for booking_id, state in report["lost"]["not_terminal"].items():
        print(f"  LOST {booking_id}: still {state}")
    for dup in report["duplicates"]["bookings"]:
        print(f"  DUPLICATE {dup['booking_id']}: {dup}")
    for cause, count in lk["by_cause"].items():
        print(f"  leaks {count:4}x {cause}")
    # The causes chaos does not explain first: they are the ones to read.
    order = ("unexplained", "cancelled", "processes", "its deletion")
    leaks = sorted(
        lk["rooms"],
        key=lambda leak: min(
            i for i, head in enumerate(order) if any(c.startswith(head) for c in leak["causes"])
        ),
    )
    for leak in leaks[:SHOWN_LEAKS]:
        print(
            f"  LEAK {leak['booking_id']} ({leak['meeting_state']}) room {leak['room']}: {leak['why']}"
            f" ({'; '.join(leak['causes'])}), "
            f"{leak['late_by_s']} s after {leak['should_be_gone_at']}; store: {leak['store']}; "
            f"DELETE replies {leak['delete_replies']}"
        )
        for event in leak["chaos_nearby"]:
            print(f"      chaos: {event}")
    if len(leaks) > SHOWN_LEAKS:
        print(f"  … and {len(leaks) - SHOWN_LEAKS} more leaks in the JSON report")
    shown = [d["booking_id"] for d in report["duplicates"]["bookings"]] + [x["booking_id"] for x in leaks]
    for booking_id in list(dict.fromkeys(shown))[:SHOWN_HISTORIES]:
        detail = report["problem_bookings"][booking_id]
        print(f"\n  history of {booking_id} (plan {detail['plan']}):")
        for line in detail["caller"]:
            print(f"    caller  {line}")
        for room in detail["rooms"]:
            print(
                f"    room    {room['meeting_id']} made {room['created_at']} end {room['end_date']} "
                f"deleted {room['deleted_at']} by {room['deleted_by']}"
            )
        for line in detail["history"][-40:]:
            print(f"    {line}")


# --------------------------------------------------------------------------------------------
# The run.


def database(arg: str | None) -> tuple[str, str, Any]:
    """(URL for the run, label, cleanup)."""
    if arg is None or arg.startswith("sqlite"):
        path = ROOT / "var" / "chaos.db"
        if arg is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = arg or f"sqlite:///{path}"
        return url, "SQLite", lambda: None
    schema = f"chaos_{os.getpid()}"
    url, drop = postgres_schema(arg, schema)
    return url, f"PostgreSQL (schema {schema})", drop


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Profile]:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--meetings", type=int, help="meetings to book (default 300; --quick 60)")
    parser.add_argument("--minutes", type=float, help="window over which they start (default 3; --quick 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smaller run")
    parser.add_argument(
        "--database", help="postgresql://… for PostgreSQL (a schema of its own); default SQLite"
    )
    parser.add_argument("--leak-grace", type=float, default=5.0, help="seconds a room may outlive its end")
    parser.add_argument(
        "--other-app", type=float, default=300, help="points a minute another app spends (default 300)"
    )
    parser.add_argument("--json", default=str(ROOT / "var" / "chaos.json"), help="where the report goes")
    args = parser.parse_args(argv)
    if args.quick:
        profile = Profile(60, 1.0, (10, 30), (5, 10), settle=45, redis_restarts=1)
    else:
        profile = Profile(300, 3.0, (10, 60), (5, 20), settle=90, redis_restarts=2)
    profile.meetings = args.meetings if args.meetings is not None else profile.meetings
    profile.minutes = args.minutes if args.minutes is not None else profile.minutes
    profile.other_app = args.other_app
    if profile.meetings < 1 or profile.minutes <= 0:
        parser.error("--meetings and --minutes must be positive")
    return args, profile


def progress(t0: float, procs: ProcessSystem, server: SandboxServer, chaos: Chaos, booked: int) -> str:
    try:
        states = Counter(procs.states().values())
    except Exception as exc:  # SQLite busy, PostgreSQL hiccup: the next line will tell
        return f"(store unreadable: {type(exc).__name__})"
    live = len(server.sandbox.rooms(include_deleted=False))
    limited = sum(c["status"] == 429 for c in server.sandbox.calls())
    shown = " ".join(f"{k} {v}" for k, v in sorted(states.items()))
    return (
        f"[{time.monotonic() - t0:5.0f}s] calls {booked} · {shown} · live rooms {live} · 429s {limited}"
        f" · chaos {sum(v for k, v in chaos.counts.items() if k != 'points_spent_by_another_app')}"
    )


def main(argv: list[str] | None = None) -> int:
    args, profile = parse_args(argv)
    rng = random.Random(args.seed)
    url, label, cleanup = database(args.database)
    started = time.monotonic()
    store.migrate(url)
    store.dispose_engines()
    server = SandboxServer(SandboxConfig(points_per_minute=BUDGET, seed=args.seed, stall_seconds=4)).start()
    procs = ProcessSystem(
        url, server.url, server.admin_url, settings={"ROOMKEEPER_API_POINTS_PER_MINUTE": str(BUDGET)}
    )
    print(
        f"chaos: {profile.meetings} meetings over {profile.minutes} min, seed {args.seed}, {label}, "
        f"Redis {procs.redis.url}, sandbox {server.url}, logs {procs.logs}",
        flush=True,
    )
    stop = threading.Event()
    caller: Caller | None = None
    chaos: Chaos | None = None
    try:
        procs.start_worker()
        procs.start_worker()
        procs.start_beat()
        t0, t0_wall = time.monotonic(), utcnow()
        bookings, actions = make_plan(profile, rng, t0_wall)
        caller = Caller(procs.redis.url, t0, stop)
        chaos = Chaos(procs, profile, rng, t0)
        caller.start(actions, LANES)
        chaos.start()
        window_end = t0 + profile.minutes * 60
        next_line = time.monotonic()
        while time.monotonic() < window_end:
            if time.monotonic() >= next_line:
                print(progress(t0, procs, server, chaos, sum(caller.stats.values())), flush=True)
                next_line += 10
            time.sleep(0.5)
        chaos.stop()
        procs.admin.set_faults(error_rate=0, lost_reply_rate=0, latency_ms=0)
        print(f"[{time.monotonic() - t0:5.0f}s] window over: faults off, chaos stopped; settling", flush=True)
        # Bounded: the last planned end (reschedules included), then time to settle.
        last_end = max(b.end for b in bookings) + timedelta(seconds=max(profile.extend) + 1)
        deadline = time.monotonic() + max(0.0, (last_end - utcnow()).total_seconds()) + profile.settle
        deadline_hit = True
        while time.monotonic() < deadline:
            if time.monotonic() >= next_line:
                chaos.keep_processes()  # stopped chaos still replaces a process that died by itself
                print(progress(t0, procs, server, chaos, sum(caller.stats.values())), flush=True)
                next_line += 10
            if not caller.busy():
                states = procs.states()
                settled = all(s in TERMINAL for s in states.values())
                if settled and not server.sandbox.rooms(include_deleted=False):
                    deadline_hit = False
                    break
            time.sleep(1)
        stop.set()
        time.sleep(1)
        report = {
            "run": {
                "seed": args.seed,
                "quick": args.quick,
                "meetings_planned": profile.meetings,
                "minutes": profile.minutes,
                "database": label,
                "workers": 2,
                "beat": 1,
                "points_per_minute": BUDGET,
                "other_app_per_minute": profile.other_app,
                "leak_grace_s": args.leak_grace,
                "started_at": iso(t0_wall),
                "took_s": round(time.monotonic() - started),
            },
            **audit(procs, bookings, chaos, caller, deadline_hit, timedelta(seconds=args.leak_grace)),
        }
    finally:
        stop.set()
        if chaos is not None and chaos.is_alive():
            chaos.stop()
        procs.stop()
        server.stop()
        cleanup()
    failing = report["duplicates"]["count"] + report["leaks"]["ours"] + len(report["strangers"]["live"])
    report["exit_status"] = 1 if failing else 0
    print_report(report)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nreport written to {out}; process logs in {report['logs']['dir']}")
    if label == "SQLite":
        print(
            f"store kept for inspection: ROOMKEEPER_DATABASE_URL={url} .venv/bin/roomkeeper show BOOKING_ID"
        )
    if failing:
        bad = sorted(
            {d["booking_id"] for d in report["duplicates"]["bookings"]}
            | {leak["booking_id"] for leak in report["leaks"]["rooms"] if not _held_by_whereby(leak)}
        )
        print(f"FAIL: duplicates or leaks in {', '.join(bad) or 'stranger rooms'}")
    return int(report["exit_status"])


if __name__ == "__main__":
    sys.exit(main())
