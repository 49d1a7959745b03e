"""The operator's `roomkeeper` commands that read and repair the store: show, list, failed, retry."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from click.testing import Result
from sqlmodel import select
from typer.testing import CliRunner

from config.settings import SettingsError, get_settings
from tests.conftest import apply_settings
from worker.adapters import whereby_calls
from worker.faces.cli.main import cli
from worker.jobs import booking
from worker.runtime.app import app
from worker.store import session_scope
from worker.store.models import History, Meeting, MeetingState, Room, RoomState, utcnow

pytestmark = pytest.mark.usefixtures("configured")


def roomkeeper(*args: str) -> Result:
    # Wide enough that rich never wraps or truncates a cell.
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Messages the commands send to the queue (recorded, not sent: no worker runs here)."""
    records: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def record(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        with lock:
            records.append((name, dict(kwargs or {})))

    monkeypatch.setattr(app, "send_task", record)
    return records


def store(
    booking_id: str,
    state: MeetingState,
    start_in: float,
    minutes: float = 30,
    last_error: str | None = None,
    lead: float = 900,
) -> int:
    """A meeting row as the service would have left it (start `start_in` seconds from now)."""
    now = utcnow()
    start = now + timedelta(seconds=start_in)
    end = start + timedelta(minutes=minutes)
    with session_scope() as session:
        meeting = Meeting(
            booking_id=booking_id,
            state=state,
            start=start,
            end=end,
            create_at=start - timedelta(seconds=lead),
            room_end=end,
            due_at=None,
            attempts=8 if state == MeetingState.FAILED else 0,
            last_error=last_error,
            created_at=now,
            updated_at=now,
        )
        session.add(meeting)
        session.flush()
        assert meeting.id is not None
        return meeting.id


def stored(booking_id: str) -> Meeting:
    with session_scope() as session:
        return session.exec(select(Meeting).where(Meeting.booking_id == booking_id)).one()


GAVE_UP = (
    "ServerError: POST /v1/meetings -> 503 Service Unavailable: Service Unavailable "
    "(gave up after 8 attempts)"
)


def test_show_prints_the_view_and_the_whole_history() -> None:
    pk = store("show-1", MeetingState.READY, start_in=600)
    now = utcnow()
    with session_scope() as session:
        room = Room(
            meeting_pk=pk,
            tag="k3x9q2ab",
            name_prefix="rk-k3x9q2ab-",
            state=RoomState.LIVE,
            whereby_id="87673375",
            room_name="/rk-k3x9q2ab-5b1f",
            room_url="https://sandbox.whereby.invalid/rk-k3x9q2ab-5b1f",
            end_date=now + timedelta(minutes=40),
            created_at=now,
            ready_at=now,
        )
        session.add(room)
        session.flush()
        meeting = session.get(Meeting, pk)
        assert meeting is not None
        meeting.room_id = room.id
        for kind, action, outcome in [
            ("state", "booked", "from 09:00 to 09:30"),
            ("state", "scheduled -> creating", "attempt 1"),
            ("whereby", "POST /meetings", "201 in 0.012s"),
            ("state", "creating -> ready", "room 87673375"),
            ("event", "room.ready", ""),
        ]:
            session.add(History(at=now, booking_id="show-1", kind=kind, action=action, outcome=outcome))
        session.add(History(at=now, booking_id="someone-else", kind="state", action="booked", outcome="x"))

    result = roomkeeper("show", "show-1")

    assert result.exit_code == 0, result.output
    view_text, _, table = result.output.partition("history of show-1")
    view = json.loads(view_text)
    assert view["booking_id"] == "show-1"
    assert view["state"] == "ready"
    assert view["room"]["meeting_id"] == "87673375"
    assert view["room"]["room_url"] == "https://sandbox.whereby.invalid/rk-k3x9q2ab-5b1f"
    rows = [line for line in table.splitlines() if "│" in line]
    assert len(rows) == 5  # this booking's history only, in order
    for row, (kind, action, outcome) in zip(
        rows,
        [
            ("state", "booked", "from 09:00 to 09:30"),
            ("state", "scheduled -> creating", "attempt 1"),
            ("whereby", "POST /meetings", "201 in 0.012s"),
            ("state", "creating -> ready", "room 87673375"),
            ("event", "room.ready", ""),
        ],
        strict=True,
    ):
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert cells[1:] == [kind, action, outcome]


def test_show_of_an_unknown_booking_exits_1_naming_it() -> None:
    result = roomkeeper("show", "nobody-77")

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    assert "no meeting with booking_id 'nobody-77'" in result.output
    assert "history of" not in result.output


def table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if "│" in line]


def test_list_shows_every_meeting_soonest_first_and_filters_by_state() -> None:
    store("later", MeetingState.SCHEDULED, start_in=7200)
    store("sooner", MeetingState.READY, start_in=600)
    store("broken", MeetingState.FAILED, start_in=3600, last_error=GAVE_UP)

    everything = roomkeeper("list")

    assert everything.exit_code == 0, everything.output
    rows = table_rows(everything.output)
    assert [(r[0], r[1]) for r in rows] == [("sooner", "ready"), ("broken", "failed"), ("later", "scheduled")]
    assert rows[1][5] == GAVE_UP

    failed_only = roomkeeper("list", "--state", "failed")

    assert failed_only.exit_code == 0, failed_only.output
    assert [(r[0], r[1]) for r in table_rows(failed_only.output)] == [("broken", "failed")]


def test_failed_lists_the_meetings_given_up_on_with_the_reason() -> None:
    store("ok-1", MeetingState.READY, start_in=600)
    store("dead-1", MeetingState.FAILED, start_in=600, last_error=GAVE_UP)
    store("dead-2", MeetingState.FAILED, start_in=900, last_error="PermissionDeniedError: 403 Forbidden")

    result = roomkeeper("failed")

    assert result.exit_code == 0, result.output
    assert "2 failed meeting(s)" in result.output
    rows = table_rows(result.output)
    assert [(r[0], r[3]) for r in rows] == [
        ("dead-1", GAVE_UP),
        ("dead-2", "PermissionDeniedError: 403 Forbidden"),
    ]


def test_retry_puts_a_failed_meeting_back_to_be_tried_afresh(sent: list[tuple[str, dict[str, Any]]]) -> None:
    store("retry-me", MeetingState.FAILED, start_in=3600, last_error=GAVE_UP)
    store("too-late", MeetingState.FAILED, start_in=-3600, last_error=GAVE_UP)
    before = utcnow()

    result = roomkeeper("retry", "retry-me", "too-late")

    assert result.exit_code == 0, result.output
    assert "retried 1: retry-me" in result.output
    meeting = stored("retry-me")
    assert meeting.state == MeetingState.SCHEDULED
    assert meeting.attempts == 0
    assert meeting.due_at == meeting.create_at  # its room is made a lead time before the start, as booked
    assert meeting.due_at is not None and meeting.due_at > before
    assert sent == []  # not due yet: beat dispatches it when it is
    over = stored("too-late")
    assert over.state == MeetingState.FAILED
    assert over.last_error == GAVE_UP
    assert ("note", "not retried: the meeting is over") in [
        (h.kind, h.action) for h in booking.history("too-late")
    ]
    assert ("state", "failed -> scheduled", "retried by an operator") in [
        (h.kind, h.action, h.outcome) for h in booking.history("retry-me")
    ]


def test_retry_of_a_meeting_whose_room_is_due_now_sends_the_work_at_once(
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    pk = store("retry-now", MeetingState.FAILED, start_in=300, last_error=GAVE_UP)  # lead 900 s: overdue
    before = utcnow()

    result = roomkeeper("retry", "retry-now")

    assert result.exit_code == 0, result.output
    meeting = stored("retry-now")
    assert meeting.state == MeetingState.SCHEDULED
    assert meeting.due_at is not None and before <= meeting.due_at <= utcnow()
    assert [(name, kwargs["meeting_pk"]) for name, kwargs in sent] == [("rooms.create_room", pk)]


def test_retry_all_retries_every_failed_meeting_not_yet_over(sent: list[tuple[str, dict[str, Any]]]) -> None:
    store("all-1", MeetingState.FAILED, start_in=3600, last_error=GAVE_UP)
    store("all-2", MeetingState.FAILED, start_in=7200, last_error=GAVE_UP)
    store("all-over", MeetingState.FAILED, start_in=-3600, last_error=GAVE_UP)
    store("all-ready", MeetingState.READY, start_in=600)

    result = roomkeeper("retry", "--all")

    assert result.exit_code == 0, result.output
    assert "retried 2:" in result.output
    assert {name: stored(name).state for name in ("all-1", "all-2", "all-over", "all-ready")} == {
        "all-1": MeetingState.SCHEDULED,
        "all-2": MeetingState.SCHEDULED,
        "all-over": MeetingState.FAILED,
        "all-ready": MeetingState.READY,
    }


def test_retry_without_ids_or_all_exits_2_and_changes_nothing() -> None:
    store("untouched", MeetingState.FAILED, start_in=3600, last_error=GAVE_UP)

    result = roomkeeper("retry")

    assert result.exit_code == 2
    assert "name the booking ids to retry, or pass --all" in result.output
    assert stored("untouched").state == MeetingState.FAILED


def test_a_retried_meeting_no_longer_shows_the_error_it_failed_with() -> None:
    store("retry-clean", MeetingState.FAILED, start_in=3600, last_error=GAVE_UP)

    assert roomkeeper("retry", "retry-clean").exit_code == 0

    (row,) = table_rows(roomkeeper("list").output)
    assert row[1] == "scheduled"
    assert row[5] == ""


def test_booking_ids_and_errors_with_square_brackets_print_as_they_are() -> None:
    error = (
        "InvalidRequestError: POST /v1/meetings -> 400 Bad Request: "
        "roomNamePrefix: must match ^[a-z0-9-]{0,39}$"
    )
    store("client[vip]-42", MeetingState.FAILED, start_in=3600, last_error=error)

    listed = roomkeeper("list")
    failed = roomkeeper("failed")

    assert table_rows(listed.output)[0][0] == "client[vip]-42"
    assert table_rows(failed.output)[0][3] == error


def test_show_of_an_unknown_booking_with_brackets_exits_1_naming_it() -> None:
    result = roomkeeper("show", "odd[/]id")

    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "no meeting with booking_id 'odd[/]id'" in result.output


# --------------------------------------------------------------------------------------------
# The commands that only read the store need no Whereby key, even pointed at the real Whereby.


@pytest.fixture
def real_whereby_without_key(configured: str) -> Iterator[None]:
    sandbox_url = os.environ["WHEREBY_API_URL"]
    apply_settings(WHEREBY_API_URL="https://api.whereby.dev/v1", WHEREBY_API_KEY=None)
    yield
    apply_settings(WHEREBY_API_URL=sandbox_url)


@pytest.mark.usefixtures("real_whereby_without_key")
def test_show_list_and_failed_run_without_a_whereby_key() -> None:
    store("no-key-ok", MeetingState.SCHEDULED, start_in=600)
    store("no-key-dead", MeetingState.FAILED, start_in=900, last_error=GAVE_UP)
    settings = get_settings()
    assert settings.is_real_whereby and settings.whereby_api_key is None  # the setting as deployed

    shown = roomkeeper("show", "no-key-dead")
    listed = roomkeeper("list")
    failed = roomkeeper("failed")

    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output.partition("history of")[0])["state"] == "failed"
    assert listed.exit_code == 0, listed.output
    assert [row[0] for row in table_rows(listed.output)] == ["no-key-ok", "no-key-dead"]
    assert failed.exit_code == 0, failed.output
    assert [(row[0], row[3]) for row in table_rows(failed.output)] == [("no-key-dead", GAVE_UP)]
    # Whatever would call Whereby still stops, naming the key (the worker and beat check it at
    # start: tests/processes/test_settings.py starts them).
    with pytest.raises(SettingsError, match="WHEREBY_API_KEY is required"):
        whereby_calls.client()


def test_show_of_an_id_the_store_cannot_hold_names_the_rule() -> None:
    # An undecodable byte in the argument reaches Python as a lone surrogate (PEP 383).
    result = roomkeeper("show", "booking-\udcff")

    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "booking_id: must not contain a lone surrogate (U+DCFF)" in result.output


def test_list_of_an_unknown_state_exits_2_naming_the_states() -> None:
    result = roomkeeper("list", "--state", "broken")

    assert result.exit_code == 2
    assert "'broken' is not one of" in result.output
    assert "failed" in result.output
