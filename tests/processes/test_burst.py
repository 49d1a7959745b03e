"""A burst of due work on real worker and beat processes (issue 16): 2,000 rooms due within 2 s.

One worker with a few threads, beat, SQLite, Whereby (the sandbox) answering in 50 ms, budget off,
the service's default intervals. Every room is made and every room deleted, once each, and the
worker receives hardly more messages than there are rows: a backlog must not turn into a storm of
copies. Outcomes, not times: the deadline only stops a run that has stalled (bench/burst.py drives
and measures it; `python -m bench.burst` is the same load as a benchmark).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bench import burst
from worker.devtools.harness import ProcessSystem
from worker.devtools.sandbox import SandboxAdmin, SandboxServer

MEETINGS = 2000
WINDOW_SECONDS = 2.0
THREADS = 8
# Messages received per row, at most: a copy now and then, never one a recovery pass.
COPIES = 1.1


@pytest.fixture
def procs(database: str, sandbox: SandboxAdmin, sandbox_server: SandboxServer) -> Iterator[ProcessSystem]:
    sandbox.set_faults(latency_ms=50)
    system = ProcessSystem(
        database, sandbox_server.url, sandbox_server.admin_url, settings=burst.settings(THREADS)
    )
    try:
        yield system
    finally:
        system.stop()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_burst_of_due_work_makes_and_deletes_every_room_with_few_copies(
    procs: ProcessSystem, sandbox: SandboxAdmin
) -> None:
    procs.start_worker()
    procs.start_beat()
    f = burst.run(procs, sandbox, n=MEETINGS, window=WINDOW_SECONDS, give_up_s=120, log=print)
    summary = f"{burst.row_line(f)}; logs in {procs.logs}; figures {f}"

    assert f["rooms_made"] == MEETINGS, summary
    assert f["rooms"] == MEETINGS, summary  # one room each: no duplicate on Whereby
    assert f["never_deleted"] == 0, summary
    assert sandbox.rooms(include_deleted=False) == [], summary
    assert f["received"].get(burst.CREATE_TASK, 0) < COPIES * MEETINGS, summary
    assert f["received"].get(burst.DELETE_TASK, 0) < COPIES * f["rooms"], summary
    shutil.rmtree(procs.logs, ignore_errors=True)  # kept only when the test fails
