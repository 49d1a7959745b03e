"""The suite's own hygiene (tests/hygiene.py): ids never reused between tests, on SQLite and
PostgreSQL; temporary files in the run's own folder; process logs kept only for a failed test; a run
that passes but leaves something behind fails."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlmodel import col, func, select

from tests import conftest, hygiene
from worker import store
from worker.jobs import booking
from worker.rules.validation import ScheduleRequest
from worker.store.models import History, Meeting, Outbox


def _book(booking_id: str) -> dict[str, int]:
    start = datetime.now(UTC) + timedelta(days=30)
    booking.schedule_meeting(
        ScheduleRequest.model_validate(
            {
                "booking_id": booking_id,
                "start": start.isoformat(),
                "end": (start + timedelta(hours=1)).isoformat(),
            }
        )
    )
    with store.session_scope() as session:
        session.add(
            Outbox(
                created_at=datetime.now(UTC),
                booking_id=booking_id,
                task="tests.ids",
                queue="ids",
                kwargs={},
                pending=False,
            )
        )
    with store.session_scope() as session:
        meeting = session.execute(select(Meeting.id).where(Meeting.booking_id == booking_id)).scalar_one()
        history = session.execute(select(func.max(History.id))).scalar_one()
        outbox = session.execute(select(func.max(col(Outbox.id)))).scalar_one()
    return {"meeting": meeting, "history": history, "outbox": outbox}


def test_ids_are_not_reused_after_the_tables_are_cleared(configured: str) -> None:
    first = _book("ids-first")
    conftest._fresh_database(configured)  # what the fixture does between two tests
    with store.session_scope() as session:
        assert session.execute(select(func.count()).select_from(Meeting)).scalar_one() == 0
    second = _book("ids-second")
    for table, before in first.items():
        assert second[table] > before, (table, first, second)


_seen: dict[str, dict[str, int]] = {}


def _kind(url: str) -> str:
    return url.split(":", 1)[0]


def test_ids_of_one_test(configured: str) -> None:
    _seen[_kind(configured)] = _book("ids-one-test")


def test_ids_of_the_next_test_are_new(configured: str) -> None:
    before = _seen.get(_kind(configured))
    if before is None:
        pytest.skip("run with test_ids_of_one_test, the test before it")
    after = _book("ids-next-test")
    for table, old in before.items():
        assert after[table] > old, (table, before, after)


# --------------------------------------------------------------------------------------------
# Temporary files.


def test_this_run_makes_its_temporary_files_in_its_own_folder(tmp_path: Path) -> None:
    folder = conftest.RUN_FOLDER.path
    assert folder.name.startswith(hygiene.PREFIX) and folder.is_dir()
    assert Path(tempfile.gettempdir()) == folder
    made = Path(tempfile.mkdtemp(prefix="roomkeeper-faults-"))
    try:
        assert made.parent == folder
    finally:
        made.rmdir()
    assert folder in tmp_path.parents  # pytest's own folders too


def _report(when: str, failed: bool) -> Any:
    return SimpleNamespace(when=when, failed=failed, sections=[])


class _Item:
    def __init__(self) -> None:
        self.stash = pytest.Stash()


@pytest.mark.parametrize("failing_phase", [None, "setup", "call", "teardown"])
def test_process_logs_go_when_the_test_passed_and_stay_named_when_it_failed(
    tmp_path: Path, failing_phase: str | None
) -> None:
    folder = hygiene.RunFolder(tmp_path)
    logs = tmp_path / "roomkeeper-faults-x"
    logs.mkdir()
    (logs / "worker1.log").write_text("a log line\n")
    running = SimpleNamespace(logs=tmp_path / "still-running", stopped=False)
    running.logs.mkdir()
    systems: list[Any] = [SimpleNamespace(logs=logs, stopped=True), running]
    item = _Item()
    reports = [_report(when, when == failing_phase) for when in ("setup", "call", "teardown")]
    for report in reports:
        folder.after_phase(item, report, systems)  # type: ignore[arg-type]
    assert running.logs.exists() and systems == [running]  # not stopped: not this test's to remove
    if failing_phase is None:
        assert not logs.exists() and folder.kept_logs == []
    else:
        assert (logs / "worker1.log").exists() and folder.kept_logs == [logs]
        assert reports[-1].sections == [("roomkeeper process logs", f"kept in {logs}")]


@pytest.mark.parametrize(
    ("exitstatus", "leave", "status_after", "removed"),
    [
        (pytest.ExitCode.OK, False, pytest.ExitCode.OK, True),
        (pytest.ExitCode.OK, True, pytest.ExitCode.TESTS_FAILED, True),
        (pytest.ExitCode.TESTS_FAILED, True, pytest.ExitCode.TESTS_FAILED, False),
    ],
)
def test_a_passing_run_that_leaves_files_behind_fails(
    tmp_path: Path, exitstatus: int, leave: bool, status_after: int, removed: bool
) -> None:
    path = tmp_path / "roomkeeper-tests-x"
    path.mkdir()
    (path / "pytest-of-someone").mkdir()  # pytest's own: pytest removes what is in it
    if leave:
        (path / "roomkeeper-redis-abc").mkdir()
    folder = hygiene.RunFolder(path)
    session = SimpleNamespace(exitstatus=exitstatus)
    folder.finish(session)  # type: ignore[arg-type]
    assert session.exitstatus == status_after
    assert path.exists() is not removed
    assert folder.left == (["roomkeeper-redis-abc"] if leave and removed else [])
