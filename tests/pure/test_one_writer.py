"""`worker/store/persist.py` is the only code that writes a meeting's or a room's lifecycle state.

Every other module asks a rule (`worker/rules/meetings.py`) for a Change and hands it to persist.
This reads the product's source (its syntax tree, so a comment or a string never counts) and names
every place outside persist that assigns a lifecycle column: an attribute assignment, a `setattr`
whose name is not a constant, a Core `.values(...)` on a meeting or room statement, a Meeting or
Room built with such a column, or an `insert(Meeting|Room)` (a new row's state is a write too).
"""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import col

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path("worker/store/persist.py")
# Dev tools are never imported by the product (the demo keeps its own `sample.state`).
NOT_PRODUCT = (Path("worker/devtools"),)
LIFECYCLE = frozenset(
    {
        "state",
        "due_at",
        "attempts",
        "replacing",
        "room_id",
        "last_error",
        "retired_reason",
        "ready_at",
        "deleted_at",
        "overrun_since",
    }
)
MODELS = frozenset({"Meeting", "Room"})
# A statement on a variable model (`update(model)`) may be about a meeting or a room.
GENERIC = frozenset({"model"})


def _statement_target(node: ast.expr) -> str | None:
    """The model an `update(X)…`/`insert(X)…` chain is about, following `.where(…)` and the like."""
    while isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("update", "insert") and node.args:
            first = node.args[0]
            return first.id if isinstance(first, ast.Name) else None
        if not isinstance(func, ast.Attribute):
            return None
        node = func.value
    return None


def writes(source: str) -> list[str]:
    """Every lifecycle write in `source`, as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                # The attribute assigned, not those it is reached through (`request.state.x = …`).
                parts = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
                for part in parts:
                    if isinstance(part, ast.Attribute) and part.attr in LIFECYCLE:
                        found.append(f"{node.lineno}: assigns .{part.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) >= 2:
                name = node.args[1]
                if not isinstance(name, ast.Constant) or name.value in LIFECYCLE:
                    found.append(f"{node.lineno}: setattr")
            elif isinstance(func, ast.Attribute) and func.attr == "values":
                model = _statement_target(func.value)
                if model in MODELS or model in GENERIC:
                    named = {kw.arg for kw in node.keywords}
                    if None in named or named & LIFECYCLE or node.args:
                        found.append(f"{node.lineno}: .values() on {model}")
            elif isinstance(func, ast.Name) and func.id in MODELS:
                named = {kw.arg for kw in node.keywords}
                if None in named or named & LIFECYCLE:
                    found.append(f"{node.lineno}: builds a {func.id}")
            elif isinstance(func, ast.Name) and func.id == "insert" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Name) and first.id in MODELS:
                    found.append(f"{node.lineno}: insert({first.id})")
    return found


def product_modules() -> list[Path]:
    paths = []
    for top in ("worker", "tasks", "config"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if not any(relative.is_relative_to(skip) for skip in NOT_PRODUCT):
                paths.append(relative)
    return paths


# The lease mechanism writes `**values` on any leased table; on a meeting or a room it refuses any
# column but its own at run time (test_a_lease_on_a_meeting_writes_no_lifecycle_state).
LEASES = Path("worker/store/leases.py")


def test_persist_is_the_only_writer_of_lifecycle_state() -> None:
    modules = product_modules()
    assert WRITER in modules and Path("worker/jobs/creation.py") in modules
    offenders = {
        str(path): found
        for path in modules
        if path not in (WRITER, LEASES) and (found := writes((ROOT / path).read_text()))
    }
    assert offenders == {}, "lifecycle state written outside worker/store/persist.py"
    assert writes((ROOT / WRITER).read_text()), "persist writes it (else this test sees nothing)"


@pytest.mark.parametrize(
    "planted",
    [
        "room.state = RoomState.ABANDONED",
        "meeting.due_at, meeting.attempts = None, 0",
        "row.attempts += 1",
        "setattr(meeting, name, value)",
        "setattr(room, 'retired_reason', 'cancelled')",
        "session.execute(update(Meeting).where(col(Meeting.id) == 1).values(**change.meeting))",
        "session.execute(update(Room).where(col(Room.id) == 1).values(state=RoomState.LIVE))",
        "session.execute(update(model).values(due_at=now))",
        "session.add(Meeting(booking_id='b', state=MeetingState.SCHEDULED))",
        "session.execute(insert(Meeting), rows)",
    ],
)
def test_a_planted_write_is_caught(planted: str) -> None:
    assert writes(f"def job():\n    {planted}\n") != []


@pytest.mark.parametrize(
    "allowed",
    [
        "change = Change(meeting={'due_at': now})  # a rule's decision, applied by persist",
        "session.execute(update(Room).where(col(Room.id) == 1).values(end_date=end))",
        "session.execute(update(Meeting).values(claim_token=None, claim_until=None))",
        "session.execute(update(EventDelivery).values(attempts=2))  # another table's own machine",
        "feed.next_poll_at = now",
        "request.state.token_name = name",
        "state = meeting.state",
        "setattr(room, 'whereby_id', made)",
        "x = '''room.state = 1'''",
    ],
)
def test_reads_and_other_columns_are_not_writes(allowed: str) -> None:
    assert writes(f"def job():\n    {allowed}\n") == []


def test_a_lease_on_a_meeting_writes_no_lifecycle_state() -> None:
    from sqlmodel import Session, create_engine

    from worker.store import leases
    from worker.store.models import EventDelivery, Meeting, Room

    with Session(create_engine("sqlite://")) as session:
        for model in (Meeting, Room):
            with pytest.raises(TypeError, match="only its own columns"):
                leases.take(
                    session, model, col(model.id) == 1, leases.lapsed(model, NOW), NOW, values={"state": "x"}
                )
            with pytest.raises(TypeError, match="only its own columns"):
                leases.release(session, model, 1, "token", due_at=NOW)
        # Another table's lease may write its own machine's columns (checked only up to the SQL).
        leases._own_columns_only(EventDelivery, {"attempts": 2})
