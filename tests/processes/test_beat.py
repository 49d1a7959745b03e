"""Beat runs its ticks in its own process: nothing but the work they find reaches the broker."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery

from config.celery import RUN_AT_START, RUN_IN_BEAT
from worker.devtools.harness import ProcessSystem, later
from worker.devtools.sandbox import SandboxAdmin, SandboxServer
from worker.runtime.beat import InBeatScheduler

TICKS = {"rooms.dispatch_due", "rooms.recover_overdue", "rooms.reconcile"}

# --------------------------------------------------------------------------------------------
# The scheduler on its own: an app of its own on an in-memory broker.


class Probe:
    """Tasks that report where they ran; `hold` keeps a run going until released."""

    def __init__(self) -> None:
        self.app = Celery("beat-probe", broker="memory://", set_as_current=False)
        self.app.conf.update(result_expires=None, beat_max_loop_interval=3600)
        self.ran: queue.Queue[str] = queue.Queue()
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

        @self.app.task(name="probe.tick", shared=False)
        def tick(label: str = "tick") -> str:
            self.ran.put(f"{label}@{threading.current_thread().name}")
            if not self.hold.wait(10):
                raise AssertionError("never released")
            if self.fail:
                raise RuntimeError("the store is down")
            return label

    def scheduler(self, **entries: dict[str, Any]) -> InBeatScheduler:
        self.app.conf.beat_schedule = entries
        return InBeatScheduler(app=self.app)

    def queued(self, name: str) -> int:
        with self.app.connection_for_read() as connection:
            simple = connection.SimpleQueue(name)
            try:
                return int(simple.qsize())
            finally:
                simple.close()

    def runs(self, timeout: float = 5) -> list[str]:
        found = [self.ran.get(timeout=timeout)]
        while not self.ran.empty():
            found.append(self.ran.get_nowait())
        return found


def in_beat(queue_name: str, every: float = 3600, **flags: bool) -> dict[str, Any]:
    options = {"queue": queue_name, RUN_IN_BEAT: True, **flags}
    return {"task": "probe.tick", "schedule": every, "options": options}


@pytest.fixture
def probe() -> Iterator[Probe]:
    probe = Probe()
    yield probe
    probe.hold.set()


def test_in_beat_entry_runs_in_a_thread_and_sends_nothing(probe: Probe) -> None:
    scheduler = probe.scheduler(
        quiet=in_beat("quiet-q"),
        sent={"task": "probe.tick", "schedule": 3600, "options": {"queue": "sent-q"}},
    )
    thread = scheduler.run_in_beat(scheduler.schedule["quiet"])
    assert thread is not None
    thread.join(5)
    assert probe.runs() == ["tick@beat-quiet"]  # not beat's own thread
    assert probe.queued("quiet-q") == 0

    # An entry without the flag is still sent, as the stock scheduler does.
    scheduler.apply_entry(scheduler.schedule["sent"], producer=scheduler.producer)
    assert probe.queued("sent-q") == 1
    assert probe.ran.empty()


def test_a_tick_is_skipped_while_the_previous_run_goes_on(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = probe.scheduler(slow=in_beat("slow-q"))
    entry = scheduler.schedule["slow"]
    probe.hold.clear()
    first = scheduler.run_in_beat(entry)
    assert first is not None
    assert probe.runs() == ["tick@beat-slow"]
    with caplog.at_level(logging.WARNING, logger="worker.runtime.beat"):
        scheduler.apply_entry(entry)
    assert scheduler.run_in_beat(entry) is None
    assert "slow (probe.tick) skipped this tick" in caplog.text
    assert probe.ran.empty()

    probe.hold.set()
    first.join(5)
    again = scheduler.run_in_beat(entry)
    assert again is not None
    again.join(5)
    assert probe.runs() == ["tick@beat-slow"]


def test_a_failing_run_is_logged_and_the_next_tick_runs_again(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = probe.scheduler(flaky=in_beat("flaky-q"))
    probe.fail = True
    with caplog.at_level(logging.ERROR, logger="worker.runtime.beat"):
        for _ in range(2):
            thread = scheduler.run_in_beat(scheduler.schedule["flaky"])
            assert thread is not None
            thread.join(5)
    assert len(probe.runs()) == 2
    failures = [r for r in caplog.records if "flaky (probe.tick) failed" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info and "the store is down" in str(r.exc_info[1]) for r in failures)


def test_the_first_tick_runs_the_run_at_start_entries_at_once(probe: Probe) -> None:
    scheduler = probe.scheduler(
        dispatch=in_beat("a-q", **{RUN_AT_START: True}) | {"kwargs": {"label": "dispatch"}},
        reconcile=in_beat("b-q") | {"kwargs": {"label": "reconcile"}},
    )
    scheduler.tick()
    time.sleep(0.3)
    # Neither is due for an hour: only the one marked to run at start-up ran.
    assert probe.runs() == ["dispatch@beat-dispatch"]
    scheduler.tick()
    time.sleep(0.3)
    assert probe.ran.empty()


def test_shutdown_waits_for_a_running_pass(probe: Probe) -> None:
    scheduler = probe.scheduler(slow=in_beat("slow-q"))
    probe.hold.clear()
    thread = scheduler.run_in_beat(scheduler.schedule["slow"])
    assert thread is not None
    probe.runs()
    threading.Timer(0.5, probe.hold.set).start()
    scheduler.close()
    assert not thread.is_alive()


# --------------------------------------------------------------------------------------------
# A real `celery beat` process beside a real worker, on a Redis of their own.


class Captured:
    """Every Celery event on the broker (task-sent included), read as Flower reads them."""

    def __init__(self, app: Celery) -> None:
        self.events: list[dict[str, Any]] = []
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"*": self.events.append})
        self.ready = threading.Event()
        self.receiver.on_consume_ready = lambda *_, **__: self.ready.set()
        self.thread = threading.Thread(
            target=self.receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False}
        )
        self.thread.daemon = True

    def __enter__(self) -> Captured:
        self.thread.start()
        assert self.ready.wait(15), "event receiver never subscribed"
        return self

    def __exit__(self, *_: Any) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.connection.release()

    def sent(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "task-sent" and name in (None, e.get("name"))]


def in_beat_runs(procs: ProcessSystem, entry: str) -> int:
    text = "".join(path.read_text(errors="replace") for path in procs.logs.glob("beat*.log"))
    return text.count(f"running {entry} (")


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    settings = {
        "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS": "1",
        "ROOMKEEPER_RECOVER_INTERVAL_SECONDS": "1",
        "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS": "1",
    }
    system = ProcessSystem(database, sandbox_server.url, sandbox_server.admin_url, settings)
    try:
        yield system
    finally:
        system.stop()


def test_beat_process_sends_only_the_work_its_ticks_find(procs: ProcessSystem) -> None:
    with Captured(procs.caller) as captured:
        procs.start_worker()
        # DEBUG: each in-process run leaves a line in beat's log, to count the ticks.
        beat = procs._spawn("beat1", "beat", "--loglevel=DEBUG")
        procs.beats.append(beat)
        procs.wait_for(lambda: in_beat_runs(procs, "dispatch-due-work") >= 2, timeout=30)

        # Its creation falls due 6 s from now and its deletion 4 s after that: beyond what a
        # commit sends at once (due within a dispatch interval and a second), and after the
        # worker's start-up kick. Only beat's dispatcher can send them.
        start = later(7)
        procs.book("beat-1", start, start + timedelta(seconds=4))
        procs.wait_for(lambda: procs.states().get("beat-1") == "ended", timeout=30)
        time.sleep(3)  # idle ticks after the meeting
        assert beat.poll() is None, f"beat died; logs in {procs.logs}"

    ticks = {
        name: in_beat_runs(procs, entry)
        for name, entry in [
            ("dispatch", "dispatch-due-work"),
            ("recover", "recover-overdue-work"),
            ("reconcile", "reconcile-with-whereby"),
        ]
    }
    assert min(ticks.values()) >= 5, ticks

    # The only tick task on the broker is the worker's own start-up kick, sent by the worker.
    tick_messages = [e for e in captured.sent() if e.get("name") in TICKS]
    assert [e["name"] for e in tick_messages] in ([], ["rooms.dispatch_due"]), tick_messages
    assert all(e["pid"] != beat.pid for e in tick_messages)
    received = [e for e in captured.events if e["type"] == "task-received" and e.get("name") in TICKS]
    assert len(received) <= 1, received

    # The room's work went out from beat's process, tagged with the booking.
    for name in ("rooms.create_room", "rooms.delete_room"):
        sent = captured.sent(name)
        assert sent, name
        assert all(e["pid"] == beat.pid and "beat-1" in str(e["kwargs"]) for e in sent), sent
    audit = procs.audit()
    assert len(audit.rooms["beat-1"]) == 1
    assert audit.rooms["beat-1"][0]["deleted_at"] is not None
