"""The domain operations behind the tasks: schedule, cancel, create and delete rooms, dispatch, reconcile."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Row, and_, event, insert, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col, select

from config.settings import Settings, get_settings
from worker import lifecycle, whereby
from worker.budget import BudgetExhausted, before_request, get_budget
from worker.models import (
    TERMINAL_STATES,
    History,
    Meeting,
    MeetingState,
    Outbox,
    Room,
    RoomState,
    utcnow,
)
from worker.requests import InvalidRequest, ScheduleRequest
from worker.store import session_scope

log = logging.getLogger(__name__)

CREATE_TASK = "rooms.create_room"
DELETE_TASK = "rooms.delete_room"
# A task that runs this much before its due instant (clock skew between hosts) still acts.
EARLY_SLACK = timedelta(seconds=2)
# Work sent but not started this long after its instant is sent again by the recovery pass.
OVERDUE_GRACE = timedelta(seconds=2)
# Claim tokens say who holds a row: the dispatcher (message sent, not started) or a running task.
DISPATCH_CLAIM, RUN_CLAIM = "d", "r"


class UnknownBooking(InvalidRequest):
    """No meeting has this booking_id."""


# --------------------------------------------------------------------------------------------
# Whereby client: one per process, its calls recorded into the running task's history.

_client: whereby.WherebyClient | None = None
_client_lock = threading.Lock()
_calls: ContextVar[list[whereby.CallRecord] | None] = ContextVar("whereby_calls", default=None)


def _record_call(record: whereby.CallRecord) -> None:
    calls = _calls.get()
    if calls is not None:
        calls.append(record)


def get_client() -> whereby.WherebyClient:
    global _client
    with _client_lock:
        if _client is None:
            settings = get_settings()
            _client = whereby.WherebyClient(
                settings.whereby_api_url,
                settings.api_key,
                timeout=settings.whereby_timeout_seconds,
                before_request=before_request,
                on_call=_record_call,
            )
        return _client


def reset_client() -> None:
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None


@contextmanager
def recording_calls() -> Iterator[list[whereby.CallRecord]]:
    calls: list[whereby.CallRecord] = []
    token = _calls.set(calls)
    try:
        yield calls
    finally:
        _calls.reset(token)


# --------------------------------------------------------------------------------------------
# Small helpers on a session.


# History and outbox rows are only ever appended. A transaction gathers them and writes each
# table's rows in one INSERT just before it commits, instead of one ORM object apiece: the unit of
# work's bookkeeping was the largest CPU cost of a room creation.
APPENDED = "roomkeeper.appended"  # session.info key: {model: [row, ...]} to insert at commit


def _append(session: Session, model: type[History] | type[Outbox], row: dict[str, Any]) -> None:
    session.info.setdefault(APPENDED, {}).setdefault(model, []).append(row)


@event.listens_for(OrmSession, "before_commit")
def _insert_appended(session: OrmSession) -> None:
    appended = session.info.pop(APPENDED, None)
    if appended:
        connection = session.connection()
        for model, rows in appended.items():
            connection.execute(insert(model), rows)


def note(session: Session, booking_id: str, kind: str, action: str, outcome: str = "") -> None:
    _append(
        session,
        History,
        {"at": utcnow(), "booking_id": booking_id, "kind": kind, "action": action[:120], "outcome": outcome},
    )


def set_state(session: Session, meeting: Meeting, state: MeetingState, why: str = "") -> None:
    if meeting.state != state:
        _note_state(session, meeting.booking_id, meeting.state, state, why)
        meeting.state = state


def _note_state(session: Session, booking_id: str, was: str, state: MeetingState, why: str) -> None:
    note(session, booking_id, "state", f"{was} -> {state}", why)
    log.info("booking %s: %s -> %s %s", booking_id, was, state, why)


def record_calls(session: Session, booking_id: str, calls: Iterable[whereby.CallRecord]) -> None:
    for call in calls:
        outcome = str(call.status) if call.status is not None else (call.error or "error")
        target = f" {call.meeting_id}" if call.meeting_id else ""
        note(
            session,
            booking_id,
            "whereby",
            f"{call.method} {call.path}{target}",
            f"{outcome} in {call.elapsed:.3f}s",
        )


def fmt(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds" if value.microsecond else "seconds").replace("+00:00", "Z")


def view(meeting: Meeting, room: Room | None) -> dict[str, Any]:
    """The meeting view of CONTRACT §2.4."""
    room_view = None
    if room is not None and room.state == RoomState.LIVE:
        room_view = {
            "meeting_id": room.whereby_id,
            "room_name": room.room_name,
            "room_url": room.room_url,
            "host_room_url": room.host_room_url,
            "viewer_room_url": room.viewer_room_url,
            "end_date": fmt(room.end_date),
        }
    return {
        "booking_id": meeting.booking_id,
        "state": meeting.state,
        "start": fmt(meeting.start),
        "end": fmt(meeting.end),
        "room": room_view,
        "metadata": meeting.meta,
        "last_error": meeting.last_error,
        "created_at": fmt(meeting.created_at),
        "updated_at": fmt(meeting.updated_at),
    }


EMITTED = "roomkeeper.emitted"  # session.info key: this transaction queued an outbox event


def emit(session: Session, meeting: Meeting, room: Room | None, event: str, now: datetime) -> None:
    """Queue an event for the caller's notify task; it leaves only once this transaction commits."""
    note(session, meeting.booking_id, "event", event)
    if not meeting.notify:
        return
    kwargs = {
        "event": event,
        "booking_id": meeting.booking_id,
        "meeting": view(meeting, room),
        "occurred_at": fmt(now),
    }
    session.info[EMITTED] = True  # see AfterCommit.flush_only_if_emitted
    _append(
        session,
        Outbox,
        {
            "created_at": now,
            "booking_id": meeting.booking_id,
            "task": meeting.notify["task"],
            "queue": meeting.notify["queue"],
            "kwargs": kwargs,
            "pending": True,
        },
    )


def _load_meeting(session: Session, booking_id: str, *, for_update: bool = False) -> Meeting | None:
    query = select(Meeting).where(Meeting.booking_id == booking_id)
    if for_update:
        query = query.with_for_update()
    return session.execute(query).scalar_one_or_none()


def _current_room(session: Session, meeting: Meeting) -> Room | None:
    return session.get(Room, meeting.room_id) if meeting.room_id is not None else None


@dataclass
class AfterCommit:
    """Work that may only start once the transaction that justifies it has committed."""

    meetings: set[int] = field(default_factory=set)
    rooms: set[int] = field(default_factory=set)
    outbox: bool = False

    def flush_only_if_emitted(self, session: Session) -> None:
        """Flush the outbox after the commit only if this transaction queued an event (`emit`)."""
        self.outbox = bool(session.info.get(EMITTED))

    def run(self) -> None:
        if self.meetings or self.rooms:
            dispatch_due(meeting_ids=self.meetings, room_ids=self.rooms)
        if self.outbox:
            flush_outbox()


# --------------------------------------------------------------------------------------------
# The caller's operations: schedule, cancel, get.


def get_meeting(booking_id: str) -> dict[str, Any]:
    with session_scope() as session:
        meeting = _load_meeting(session, booking_id)
        if meeting is None:
            raise UnknownBooking(f"booking_id: no meeting with booking_id {booking_id!r}")
        return view(meeting, _current_room(session, meeting))


def schedule_meeting(request: ScheduleRequest) -> dict[str, Any]:
    try:
        return _schedule(request)
    except IntegrityError:
        # Two first bookings of one id raced; the loser now finds the row and reschedules it.
        return _schedule(request)


def _schedule(request: ScheduleRequest) -> dict[str, Any]:
    settings = get_settings()
    now = utcnow()
    create_at, room_end = lifecycle.plan(request.start, request.end, settings)
    after = AfterCommit()
    with session_scope() as session:
        meeting = _load_meeting(session, request.booking_id, for_update=True)
        fields: dict[str, Any] = {
            "start": request.start,
            "end": request.end,
            "create_at": create_at,
            "room_end": room_end,
            "room_options": request.room.model_dump(exclude_none=True),
            "notify": request.notify.model_dump() if request.notify else None,
            "meta": request.metadata,
            "updated_at": now,
        }
        if meeting is None:
            meeting = Meeting(
                booking_id=request.booking_id,
                state=MeetingState.SCHEDULED,
                due_at=create_at,
                created_at=now,
                **fields,
            )
            session.add(meeting)
            note(
                session, meeting.booking_id, "state", "booked", f"{fmt(request.start)} to {fmt(request.end)}"
            )
            log.info("booking %s: scheduled, room due at %s", meeting.booking_id, fmt(create_at))
        else:
            old_room_end = meeting.room_end
            for name, value in fields.items():
                setattr(meeting, name, value)
            note(
                session,
                meeting.booking_id,
                "state",
                "rescheduled",
                f"{fmt(request.start)} to {fmt(request.end)}",
            )
            _reschedule(session, meeting, old_room_end, now, after)
        session.flush()
        assert meeting.id is not None
        # Work due before the dispatcher's next tick goes out right after the commit; anything
        # later is the dispatcher's, so a booking days ahead costs no dispatch query at all.
        if meeting.due_at is not None and meeting.due_at <= dispatch_horizon(now, settings):
            after.meetings.add(meeting.id)
        after.flush_only_if_emitted(session)
        result = view(meeting, _current_room(session, meeting))
    after.run()
    return result


def _reschedule(
    session: Session, meeting: Meeting, old_room_end: datetime, now: datetime, after: AfterCommit
) -> None:
    room = _current_room(session, meeting)
    if meeting.state in TERMINAL_STATES:
        if room is not None:
            # The room of the old booking is still being deleted; the new booking gets its own.
            meeting.room_id = None
        meeting.attempts = 0
        meeting.last_error = None
        meeting.next_attempt_at = None
        meeting.replacing = False
        meeting.due_at = meeting.create_at
        set_state(session, meeting, MeetingState.SCHEDULED, "booked again")
        return
    if room is None:
        # No room yet: creation simply moves. A creation already running checks, when it
        # finishes, whether its room still covers the meeting.
        meeting.attempts = 0
        meeting.next_attempt_at = None
        meeting.due_at = meeting.create_at
        if meeting.create_at > now and meeting.state == MeetingState.CREATING:
            set_state(session, meeting, MeetingState.SCHEDULED, "rescheduled")
        return
    if lifecycle.covers(room.end_date, meeting.room_end):
        # The room's endDate still covers the new end: keep the room and its URLs, move the deletion.
        room.due_at = meeting.room_end
        assert room.id is not None
        after.rooms.add(room.id)
        if meeting.state == MeetingState.DELETING:
            set_state(session, meeting, MeetingState.READY, "rescheduled before the deletion finished")
        return
    # The new end is past the room's endDate: a new room replaces this one. If the new room is due
    # now, the old one lives until it is ready (or its own end); otherwise it goes at once.
    room.retired_reason = "replaced"
    room.due_at = now if meeting.create_at > now else min(old_room_end, room.due_at or old_room_end)
    assert room.id is not None
    after.rooms.add(room.id)
    meeting.room_id = None
    meeting.replacing = True
    meeting.attempts = 0
    meeting.next_attempt_at = None
    meeting.due_at = meeting.create_at
    set_state(session, meeting, MeetingState.SCHEDULED, "room must be replaced: new end is past its endDate")


def cancel_meeting(booking_id: str) -> dict[str, Any]:
    now = utcnow()
    after = AfterCommit(outbox=True)
    with session_scope() as session:
        meeting = _load_meeting(session, booking_id, for_update=True)
        if meeting is None:
            raise UnknownBooking(f"booking_id: no meeting with booking_id {booking_id!r}")
        room = _current_room(session, meeting)
        if meeting.state not in (MeetingState.CANCELLED, MeetingState.ENDED):
            set_state(session, meeting, MeetingState.CANCELLED, "cancelled by the caller")
            meeting.due_at = None
            meeting.next_attempt_at = None
            # Releasing the claim makes a creation in flight find, when it finishes, that its
            # room is not wanted; it then deletes it.
            meeting.claim_token = None
            meeting.claim_until = None
            meeting.updated_at = now
            if room is not None and room.state == RoomState.LIVE:
                room.due_at = now
                room.retired_reason = "cancelled"
                assert room.id is not None
                after.rooms.add(room.id)
            # A room waiting for its replacement goes now too: no replacement is coming.
            for old in session.exec(
                select(Room).where(
                    Room.meeting_pk == meeting.id,
                    Room.state == RoomState.LIVE,
                    Room.retired_reason == "replaced",
                )
            ):
                old.due_at = now
                assert old.id is not None
                after.rooms.add(old.id)
        result = view(meeting, room)
    after.run()
    return result


# --------------------------------------------------------------------------------------------
# Claims: the conditional updates that make a second delivery a no-op.

M = TypeVar("M", Meeting, Room)


def _take_claim(
    session: Session, model: type[M], pk: int, claim: str, settings: Settings, *columns: Any
) -> Row[Any] | None:
    """Swap the dispatcher's claim for this run's own; None if another delivery got there first.

    One Core UPDATE … RETURNING: the row's new `claim_token` (the run's token) and `columns`."""
    run = RUN_CLAIM + uuid.uuid4().hex
    lease = utcnow() + timedelta(seconds=settings.claim_lease_seconds)
    return (
        session.connection()
        .execute(
            update(model)
            .where(col(model.id) == pk, col(model.claim_token) == claim)
            .values(claim_token=run, claim_until=lease)
            .returning(col(model.claim_token), *columns)
        )
        .one_or_none()
    )


class _Renewer:
    """Keeps running tasks' claims alive while they wait on Whereby: one thread per process
    renews every claim held in it, in one transaction, each third of a lease. A dead process
    stops renewing, so its work is picked up again one lease later instead of after any fixed
    worst case."""

    def __init__(self) -> None:
        # (model, pk, run): the run is part of the key, so a late finisher and the run that took
        # its claim over, both in this process, never drop each other's renewal.
        self._held: set[tuple[type[Meeting] | type[Room], int, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, model: type[M], pk: int, run: str) -> Iterator[None]:
        key = (model, pk, run)
        with self._lock:
            self._held.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="claim-renewer", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(key)

    def _run(self) -> None:
        while True:
            lease = get_settings().claim_lease_seconds
            time.sleep(lease / 3)
            with self._lock:
                held = list(self._held)
            if held:
                try:
                    self.renew(held, lease)
                except Exception:  # the next round, or the lease running out, settles it
                    log.exception("renewing %d claims failed", len(held))

    @staticmethod
    def renew(held: Sequence[tuple[type[Meeting] | type[Room], int, str]], lease: float) -> None:
        until = utcnow() + timedelta(seconds=lease)
        with session_scope() as session:
            for model in (Meeting, Room):
                pks = [pk for kind, pk, _ in held if kind is model]
                runs = [run for kind, _, run in held if kind is model]
                if pks:
                    # Run tokens are unique, so a token can only match the row that holds it.
                    session.execute(
                        update(model)
                        .where(col(model.id).in_(pks), col(model.claim_token).in_(runs))
                        .values(claim_until=until)
                    )

    def forget_after_fork(self) -> None:
        # A forked child has no renewer thread, and may have copied a lock some thread held.
        self.__init__()  # type: ignore[misc]


_renewer = _Renewer()
os.register_at_fork(after_in_child=_renewer.forget_after_fork)


def _release(row: Meeting | Room) -> None:
    row.claim_token = None
    row.claim_until = None


def _holds(row: Meeting | Room, run: str) -> bool:
    return row.claim_token == run


class WherebyKeyRejected(RuntimeError):
    """Raised by a task after Whereby answered 401, so the failure shows in Flower too."""


def _heed_rate_limit(error: Exception) -> None:
    if isinstance(error, whereby.RateLimitedError) and not isinstance(error, BudgetExhausted):
        get_budget().pause(error.retry_after)
    elif isinstance(error, whereby.AuthenticationError):
        get_budget().pause(lifecycle.AUTH_PAUSE_SECONDS, "Whereby rejected the API key (401)")


def _raise_if_key_rejected(error: Exception) -> None:
    if isinstance(error, whereby.AuthenticationError):
        raise WherebyKeyRejected(
            "Whereby rejected the API key (401): set a valid WHEREBY_API_KEY; "
            f"Whereby calls pause {lifecycle.AUTH_PAUSE_SECONDS}s at a time until it is fixed"
        )


# --------------------------------------------------------------------------------------------
# Creating a room.


@dataclass
class CreatePlan:
    run: str
    room_pk: int
    booking_id: str
    name_prefix: str
    request: whereby.CreateMeetingRequest
    look_up_first: bool


def create_room(meeting_pk: int, claim: str) -> str:
    """Make the meeting's room on Whereby. Returns what happened, for the task's result."""
    settings = get_settings()
    plan = _start_create(meeting_pk, claim, settings)
    if isinstance(plan, str):
        return plan
    with recording_calls() as calls, _renewer.holding(Meeting, meeting_pk, plan.run):
        try:
            made = _make_room(plan)
        except whereby.WherebyError as error:
            _create_failed(meeting_pk, plan, error, calls, settings)
            _raise_if_key_rejected(error)
            return f"failed: {lifecycle.describe(error)}"
    return _create_succeeded(meeting_pk, plan, made, calls, settings)


def _start_create(meeting_pk: int, claim: str, settings: Settings) -> CreatePlan | str:
    """Claim the meeting, record the attempt and its pending room, and say what to ask Whereby.

    The common case (due, wanted, not over) is plain SQL: this transaction runs once for every
    room made, and the ORM's unit of work cost more CPU than the Whereby call itself."""
    now = utcnow()
    with session_scope() as session:
        claimed = _take_claim(
            session,
            Meeting,
            meeting_pk,
            claim,
            settings,
            Meeting.booking_id,
            Meeting.state,
            Meeting.due_at,
            Meeting.room_end,
            Meeting.room_options,
            Meeting.attempts,
        )
        if claimed is None:
            return "skipped: claim already taken (duplicate delivery)"
        skipped = None
        if claimed.state not in (MeetingState.SCHEDULED, MeetingState.CREATING) or claimed.due_at is None:
            skipped = f"skipped: meeting is {claimed.state}"
        elif claimed.due_at > now + EARLY_SLACK:
            skipped = "skipped: not due yet"  # rescheduled later since dispatch: the dispatcher comes back
        elif claimed.room_end <= now:
            meeting = session.get(Meeting, meeting_pk, populate_existing=True)
            assert meeting is not None
            return _over_before_its_room(session, meeting, now)
        if skipped is not None:
            session.execute(
                update(Meeting)
                .where(col(Meeting.id) == meeting_pk)
                .values(claim_token=None, claim_until=None)
            )
            return skipped
        pending = session.execute(
            select(Room.id, Room.name_prefix)
            .where(Room.meeting_pk == meeting_pk, Room.state == RoomState.PENDING)
            .order_by(col(Room.id))
            .limit(1)
        ).first()
        options = dict(claimed.room_options)
        caller_prefix = options.pop("room_name_prefix", None)
        connection = session.connection()
        if pending is None:
            tag = lifecycle.new_tag()
            name_prefix = lifecycle.room_name_prefix(settings.room_prefix, tag, caller_prefix)
            room_pk = connection.execute(
                insert(Room)
                .values(
                    meeting_pk=meeting_pk,
                    tag=tag,
                    name_prefix=name_prefix,
                    state=RoomState.PENDING,
                    end_date=claimed.room_end,
                    created_at=now,
                )
                .returning(col(Room.id))
            ).scalar_one()
            look_up_first = False
        else:
            # An earlier attempt's outcome is unknown: its room may exist. Look before creating.
            room_pk, name_prefix = pending
            connection.execute(update(Room).where(col(Room.id) == room_pk).values(end_date=claimed.room_end))
            look_up_first = True
        assert room_pk is not None
        attempt = claimed.attempts + 1
        connection.execute(
            update(Meeting)
            .where(col(Meeting.id) == meeting_pk)
            .values(attempts=attempt, updated_at=now, state=MeetingState.CREATING)
        )
        if claimed.state != MeetingState.CREATING:
            _note_state(
                session, claimed.booking_id, claimed.state, MeetingState.CREATING, f"attempt {attempt}"
            )
        request = whereby.CreateMeetingRequest(
            end_date=claimed.room_end, room_name_prefix=name_prefix, **options
        )
        return CreatePlan(
            claimed.claim_token, room_pk, claimed.booking_id, name_prefix, request, look_up_first
        )


def _over_before_its_room(session: Session, meeting: Meeting, now: datetime) -> str:
    """Over before a room could be made (a long outage): making one now helps nobody."""
    _release(meeting)
    meeting.due_at = None
    meeting.updated_at = now
    if meeting.replacing:
        meeting.replacing = False
        set_state(session, meeting, MeetingState.ENDED, "ended before its replacement room was made")
        emit(session, meeting, None, "room.deleted", now)
    else:
        meeting.last_error = "the meeting ended before a room could be made"
        set_state(session, meeting, MeetingState.FAILED, meeting.last_error)
        emit(session, meeting, None, "room.failed", now)
    return f"skipped: meeting already over ({meeting.state})"


def _make_room(plan: CreatePlan) -> whereby.Meeting:
    client = get_client()
    fields = plan.request.fields or []
    if plan.look_up_first:
        for found in client.list_meetings(room_name_prefix=plan.name_prefix, fields=fields):
            log.info(
                "booking %s: adopted room %s made by an earlier attempt", plan.booking_id, found.meeting_id
            )
            return found
    return client.create_meeting(plan.request)


def _fill_room(room: Room, made: whereby.Meeting, now: datetime) -> None:
    room.state = RoomState.LIVE
    room.whereby_id = made.meeting_id
    room.room_name = made.room_name
    room.room_url = made.room_url
    room.host_room_url = made.host_room_url
    room.viewer_room_url = made.viewer_room_url
    room.end_date = made.end_date
    room.ready_at = now


def _create_succeeded(
    meeting_pk: int,
    plan: CreatePlan,
    made: whereby.Meeting,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> str:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        record_calls(session, plan.booking_id, calls)
        meeting, room = session.execute(
            select(Meeting, Room)
            .join(Room, col(Room.meeting_pk) == col(Meeting.id))
            .where(col(Meeting.id) == meeting_pk, col(Room.id) == plan.room_pk)
        ).one()
        if meeting.claim_token is not None and not _holds(meeting, plan.run):
            # Our claim lapsed and another run holds the meeting now. It owns this attempt (it
            # looks the room up by its tag and adopts it), so this late finisher changes nothing.
            note(session, meeting.booking_id, "note", f"late finisher left room {made.meeting_id} alone")
            return "claim taken over: the room is left to the run that holds the meeting now"
        if room.state != RoomState.PENDING:
            _release(meeting)  # the reconciler settled this attempt meanwhile
            return f"skipped: the attempt's room is already {room.state}"
        _fill_room(room, made, now)
        assert room.id is not None
        if not _holds(meeting, plan.run) or meeting.state != MeetingState.CREATING:
            # Cancelled, or taken over, while the room was being made: it must not live on.
            room.due_at = now
            room.retired_reason = "unwanted"
            after.rooms.add(room.id)
            note(
                session,
                meeting.booking_id,
                "note",
                f"room {made.meeting_id} not wanted any more",
                meeting.state,
            )
            outcome = "made a room nobody wants any more; deleting it"
        elif not lifecycle.covers(room.end_date, meeting.room_end):
            # Rescheduled to a later end while this room was being made: make another.
            room.due_at = now
            room.retired_reason = "replaced"
            after.rooms.add(room.id)
            _release(meeting)
            outcome = "room too short for the rescheduled meeting; making another"
            if meeting.attempts >= settings.max_attempts:
                # Whereby keeps answering an endDate short of the one asked for: stop, loudly.
                outcome = f"Whereby's endDate {fmt(room.end_date)} stays short of {fmt(meeting.room_end)}"
                meeting.due_at = None
                meeting.last_error = outcome
                set_state(session, meeting, MeetingState.FAILED, outcome)
                emit(session, meeting, None, "room.failed", now)
            else:
                meeting.due_at = max(meeting.create_at, now)
                after.meetings.add(meeting_pk)
        else:
            meeting.room_id = room.id
            meeting.due_at = None
            meeting.next_attempt_at = None
            meeting.last_error = None
            meeting.updated_at = now
            _release(meeting)
            room.due_at = meeting.room_end
            if room.due_at <= dispatch_horizon(now, settings):
                after.rooms.add(room.id)  # a later deletion is the dispatcher's
            set_state(session, meeting, MeetingState.READY, f"room {made.meeting_id}")
            event = "room.ready"
            if meeting.replacing:
                event = "room.replaced"
                meeting.replacing = False
                # The room this one replaces has served its purpose now.
                session.execute(
                    update(Room)
                    .where(
                        col(Room.meeting_pk) == meeting_pk,
                        col(Room.retired_reason) == "replaced",
                        col(Room.state) == RoomState.LIVE,
                        col(Room.due_at) > now,
                    )
                    .values(due_at=now)
                )
                after.rooms.update(
                    session.execute(
                        select(Room.id).where(
                            Room.meeting_pk == meeting_pk,
                            Room.retired_reason == "replaced",
                            Room.state == RoomState.LIVE,
                        )
                    ).scalars()
                )
            emit(session, meeting, room, event, now)
            outcome = f"{event}: {made.meeting_id}"
        after.flush_only_if_emitted(session)
    after.run()
    return outcome


def _create_failed(
    meeting_pk: int,
    plan: CreatePlan,
    error: whereby.WherebyError,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> None:
    now = utcnow()
    reason = lifecycle.describe(error)
    _heed_rate_limit(error)
    if isinstance(error, whereby.AuthenticationError):
        log.error(
            "Whereby rejected the API key (401): check WHEREBY_API_KEY; booking %s waits", plan.booking_id
        )
    else:
        log.warning("booking %s: creating the room failed: %s", plan.booking_id, reason)
    after = AfterCommit()
    with session_scope() as session:
        record_calls(session, plan.booking_id, calls)
        meeting = session.get(Meeting, meeting_pk, populate_existing=True)
        room = session.get(Room, plan.room_pk, populate_existing=True)
        assert meeting is not None and room is not None
        if not plan.look_up_first and not lifecycle.outcome_unknown(error):
            room.state = RoomState.ABANDONED  # Whereby certainly made nothing for this attempt
        if not _holds(meeting, plan.run):
            return
        _release(meeting)
        meeting.last_error = reason
        meeting.updated_at = now
        decision = lifecycle.after_create_error(error, meeting.attempts, now, meeting.room_end, settings)
        if not lifecycle.counts_as_attempt(error):
            meeting.attempts -= 1
        if isinstance(decision, lifecycle.GiveUp):
            meeting.last_error = decision.reason
            meeting.due_at = None
            meeting.next_attempt_at = None
            set_state(session, meeting, MeetingState.FAILED, decision.reason)
            emit(session, meeting, None, "room.failed", now)
        else:
            meeting.due_at = meeting.next_attempt_at = decision.at
            after.meetings.add(meeting_pk)
            note(session, meeting.booking_id, "note", "retry planned", f"at {fmt(decision.at)}: {reason}")
        after.flush_only_if_emitted(session)
    after.run()


# --------------------------------------------------------------------------------------------
# Deleting a room.


def delete_room(room_pk: int, claim: str) -> str:
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        claimed = _take_claim(session, Room, room_pk, claim, settings)
        if claimed is None:
            return "skipped: claim already taken (duplicate delivery)"
        run = claimed.claim_token
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk)
        assert meeting is not None
        if room.state != RoomState.LIVE or room.due_at is None:
            _release(room)
            return f"skipped: room is {room.state}"
        if room.due_at > now + EARLY_SLACK:
            _release(room)
            return "skipped: not due yet"
        if meeting.room_id == room.id and meeting.state == MeetingState.READY:
            set_state(session, meeting, MeetingState.DELETING, f"room {room.whereby_id}")
        booking_id = meeting.booking_id
        whereby_id = room.whereby_id
        expired = now > room.end_date + lifecycle.WHEREBY_SELF_DELETE
    with recording_calls() as calls, _renewer.holding(Room, room_pk, run):
        try:
            # Past Whereby's own clean-up there is nothing left to delete.
            existed = False if expired or whereby_id is None else get_client().delete_meeting(whereby_id)
        except whereby.WherebyError as error:
            _delete_failed(room_pk, run, booking_id, error, calls, settings)
            _raise_if_key_rejected(error)
            return f"failed: {lifecycle.describe(error)}"
    return _delete_succeeded(room_pk, run, existed, calls)


def _delete_succeeded(room_pk: int, run: str, existed: bool, calls: Sequence[whereby.CallRecord]) -> str:
    now = utcnow()
    after = AfterCommit()
    with session_scope() as session:
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        meeting = session.get(Meeting, room.meeting_pk, populate_existing=True)
        assert meeting is not None
        record_calls(session, meeting.booking_id, calls)
        # Rescheduled to a later end while this deletion was already on its way to Whereby.
        extended = room.due_at is not None and room.due_at > now + EARLY_SLACK
        # The room is gone whoever holds the claim now: record that, it is a fact.
        room.state = RoomState.DELETED
        room.deleted_at = now
        room.due_at = None
        room.last_error = None
        _release(room)
        outcome = "deleted" if existed else "already gone"
        note(
            session,
            meeting.booking_id,
            "note",
            f"room {room.whereby_id} {outcome}",
            room.retired_reason or "end",
        )
        if meeting.room_id == room.id:
            meeting.room_id = None
            meeting.updated_at = now
            if extended and meeting.state == MeetingState.READY:
                # The meeting goes on: it gets a new room at once (sent as room.replaced).
                meeting.replacing = True
                meeting.attempts = 0
                meeting.due_at = now
                assert meeting.id is not None
                after.meetings.add(meeting.id)
                set_state(session, meeting, MeetingState.CREATING, "room deleted just before a reschedule")
            else:
                if meeting.state in (MeetingState.READY, MeetingState.DELETING):
                    set_state(session, meeting, MeetingState.ENDED, f"room {room.whereby_id} {outcome}")
                emit(session, meeting, None, "room.deleted", now)
        after.flush_only_if_emitted(session)
    after.run()
    return outcome


def _delete_failed(
    room_pk: int,
    run: str,
    booking_id: str,
    error: whereby.WherebyError,
    calls: Sequence[whereby.CallRecord],
    settings: Settings,
) -> None:
    now = utcnow()
    reason = lifecycle.describe(error)
    _heed_rate_limit(error)
    # The retry is sent as soon as this commits, with its ETA, not at the dispatcher's next tick:
    # a deletion must not wait up to a whole dispatch interval after a 429 or a 5xx.
    after = AfterCommit()
    with session_scope() as session:
        record_calls(session, booking_id, calls)
        room = session.get(Room, room_pk, populate_existing=True)
        assert room is not None
        if not _holds(room, run):
            return
        _release(room)
        room.attempts += 1
        room.last_error = reason
        room.due_at = room.next_attempt_at = lifecycle.after_delete_error(error, room.attempts, now, settings)
        after.rooms.add(room_pk)
        note(session, booking_id, "note", "deletion retry planned", f"at {fmt(room.due_at)}: {reason}")
        level = (
            logging.ERROR
            if room.attempts >= settings.max_attempts or isinstance(error, whereby.AuthenticationError)
            else logging.WARNING
        )
        log.log(
            level,
            "booking %s: deleting room %s failed (attempt %d): %s",
            booking_id,
            room.whereby_id,
            room.attempts,
            reason,
        )
        meeting = session.get(Meeting, room.meeting_pk)
        if meeting is not None and meeting.room_id == room.id:
            meeting.last_error = reason
    after.run()


# --------------------------------------------------------------------------------------------
# The dispatcher: claims what is due before the next tick and sends it with an exact ETA.


def _claim_due(
    session: Session,
    model: type[M],
    now: datetime,
    horizon: datetime,
    ids: set[int] | None,
    limit: int,
    lease: timedelta,
    overdue_before: datetime | None = None,
) -> list[tuple[int, datetime, str]]:
    token = DISPATCH_CLAIM + uuid.uuid4().hex
    claimable = or_(col(model.claim_until).is_(None), col(model.claim_until) < now)
    if overdue_before is not None:
        # Sent but still not started well after its instant: the worker holding the message is
        # gone (or far behind). Send it again; whichever copy starts first does the work.
        claimable = or_(
            claimable,
            and_(col(model.claim_token).startswith(DISPATCH_CLAIM), col(model.due_at) <= overdue_before),
        )
    due = and_(col(model.due_at).is_not(None), col(model.due_at) <= horizon, claimable)
    candidates = select(model.id).where(due)
    if ids is not None:
        candidates = candidates.where(col(model.id).in_(ids))
    picked = list(session.execute(candidates.order_by(col(model.due_at)).limit(limit)).scalars())
    if not picked:
        return []
    rows = session.execute(
        update(model)
        .where(col(model.id).in_(picked), due)
        .values(claim_token=token, claim_until=horizon + lease)
        .returning(col(model.id), col(model.due_at))
    ).all()
    return [(pk, due_at, token) for pk, due_at in rows]


def dispatch_horizon(now: datetime, settings: Settings) -> datetime:
    """Work due before this instant is sent now, with an ETA; later work waits for a later tick."""
    return now + timedelta(seconds=settings.dispatch_interval_seconds + 1)


def dispatch_due(
    meeting_ids: set[int] | None = None,
    room_ids: set[int] | None = None,
    limit: int = 2000,
    overdue_only: bool = False,
) -> dict[str, int]:
    """Claim due creations and deletions and send each with an ETA at its due instant.

    `overdue_only`: the frequent recovery pass: only work already due whose claim lapsed (a
    killed worker stops renewing it) or whose message was never started.
    """
    from worker.app import app

    settings = get_settings()
    now = utcnow()
    horizon = dispatch_horizon(now, settings)
    overdue_before = None
    if overdue_only:
        horizon = now
        overdue_before = now - OVERDUE_GRACE
    lease = timedelta(seconds=settings.claim_lease_seconds)
    counts = {"create": 0, "delete": 0}
    only_some = meeting_ids is not None or room_ids is not None
    while True:
        with session_scope() as session:
            creations = []
            if not only_some or meeting_ids:
                creations = _claim_due(
                    session, Meeting, now, horizon, meeting_ids, limit, lease, overdue_before
                )
            deletions = []
            if not only_some or room_ids:
                deletions = _claim_due(session, Room, now, horizon, room_ids, limit, lease, overdue_before)
        for task, rows, kwarg in (
            (CREATE_TASK, creations, "meeting_pk"),
            (DELETE_TASK, deletions, "room_pk"),
        ):
            for pk, due_at, token in rows:
                # Nobody waits on these results: the message says so, or it would override the
                # task's own ignore_result and cost three result-backend round trips a task.
                app.send_task(
                    task,
                    kwargs={kwarg: pk, "claim": token},
                    queue=settings.queue,
                    eta=max(due_at, now),
                    ignore_result=True,
                )
        counts["create"] += len(creations)
        counts["delete"] += len(deletions)
        if len(creations) < limit and len(deletions) < limit:
            break
    if counts["create"] or counts["delete"]:
        log.info("dispatched %d creations and %d deletions", counts["create"], counts["delete"])
    return counts


# One flush at a time per process: a thread that finds one running leaves its events to it, and
# the running flush goes round once more, so every commit's events still leave at once. Under load
# one flush then sends the events of many creations instead of each creation paying for its own.
_flushing = threading.Lock()
_flush_wanted = threading.Event()


def flush_outbox(limit: int = 500) -> int:
    """Send the events whose transactions have committed; at least once, in order per booking.

    Returns how many events this call sent (0 when another thread's flush takes them over)."""
    sent = 0
    _flush_wanted.set()
    while _flush_wanted.is_set() and _flushing.acquire(blocking=False):
        # Re-checked after each release: a request that came while the lock was held is served.
        try:
            while _flush_wanted.is_set():
                _flush_wanted.clear()
                sent += _flush_outbox_pass(limit)
        finally:
            _flushing.release()
    return sent


def _flush_outbox_pass(limit: int) -> int:
    from worker.app import app

    sent = 0
    while True:
        now = utcnow()
        ready = and_(
            col(Outbox.pending).is_(True),
            or_(col(Outbox.claim_until).is_(None), col(Outbox.claim_until) < now),
        )
        oldest = select(Outbox.id).where(ready).order_by(col(Outbox.id)).limit(limit)
        with session_scope() as session:
            claimed = session.execute(
                update(Outbox)
                .where(col(Outbox.id).in_(oldest.scalar_subquery()), ready)
                .values(claim_until=now + timedelta(seconds=60))
                .returning(
                    col(Outbox.id),
                    col(Outbox.booking_id),
                    col(Outbox.task),
                    col(Outbox.queue),
                    col(Outbox.kwargs),
                )
            ).all()
        if not claimed:
            return sent
        rows = sorted(claimed, key=lambda row: row.id)  # RETURNING has no order; events go in id order
        done = []
        for row in rows:
            try:
                # The caller's task, not ours: its result is nobody's to wait on either.
                app.send_task(row.task, kwargs=row.kwargs, queue=row.queue, ignore_result=True)
            except Exception:  # the broker is down: the claim lapses and a later flush retries
                log.exception(
                    "sending event %s for booking %s failed", row.kwargs.get("event"), row.booking_id
                )
                break
            done.append(row.id)
        if done:
            with session_scope() as session:
                session.execute(
                    update(Outbox).where(col(Outbox.id).in_(done)).values(pending=False, sent_at=utcnow())
                )
        sent += len(done)
        if len(done) < len(rows) or len(rows) < limit:
            return sent


# --------------------------------------------------------------------------------------------
# The reconciler: compares the store with what Whereby actually holds and repairs the difference.


def reconcile() -> dict[str, int]:
    settings = get_settings()
    started = utcnow()
    # Rooms made this recently are left alone: their creator may not have recorded them yet.
    grace = timedelta(seconds=settings.reconcile_grace_seconds)
    counts = {"listed": 0, "orphans_deleted": 0, "lost_rooms": 0, "adopted": 0, "retired": 0}
    with recording_calls() as calls:
        try:
            rooms = list(get_client().list_meetings(room_name_prefix=f"{settings.room_prefix}-"))
        except whereby.WherebyError as error:
            _heed_rate_limit(error)
            log.warning("reconciler: listing Whereby's rooms failed, trying next time: %s", error)
            return counts
        listed = {m.meeting_id: m for m in rooms}
    counts["listed"] = len(listed)
    after = AfterCommit(outbox=True)
    orphans: list[tuple[str, str]] = []
    with session_scope() as session:
        if calls:
            record_calls(session, "(reconciler)", calls)
        known = (
            {
                room.whereby_id: room
                for room in session.execute(
                    select(Room).where(col(Room.whereby_id).in_(list(listed)))
                ).scalars()
            }
            if listed
            else {}
        )
        for whereby_id, found in listed.items():
            room = known.get(whereby_id)
            if room is not None and room.state == RoomState.LIVE:
                continue
            if found.start_date is not None and found.start_date > started - grace:
                continue  # just made: its creator may still be recording it
            if room is None:
                room = _pending_owner(session, found.room_name or "")
                outcome = _adopt_pending(session, room, found, started, after) if room is not None else None
                if outcome is not None:
                    if outcome != "running":
                        counts[outcome] += 1
                    continue
            orphans.append((whereby_id, _booking_of(session, room.meeting_pk) if room else "(unknown)"))
        # Rooms the store thinks are live that Whereby no longer has.
        live = session.execute(
            select(Room).where(Room.state == RoomState.LIVE, col(Room.ready_at) < started - grace)
        ).scalars()
        for room in live:
            if room.whereby_id in listed:
                continue
            counts["lost_rooms"] += 1
            _room_lost(session, room, started, after)
    with recording_calls() as calls:
        for whereby_id, booking in orphans:
            try:
                get_client().delete_meeting(whereby_id)
                counts["orphans_deleted"] += 1
                log.warning("reconciler: deleted orphan room %s (%s)", whereby_id, booking)
            except whereby.WherebyError as error:
                log.warning("reconciler: deleting orphan room %s failed: %s", whereby_id, error)
    if calls or orphans:
        with session_scope() as session:
            record_calls(session, "(reconciler)", calls)
            for whereby_id, booking in orphans:
                note(session, str(booking), "note", f"reconciler deleted orphan room {whereby_id}")
    after.run()
    log.info("reconciled: %s", counts)
    return counts


def _booking_of(session: Session, meeting_pk: int) -> str:
    meeting = session.get(Meeting, meeting_pk)
    return meeting.booking_id if meeting else "(unknown)"


def _pending_owner(session: Session, room_name: str) -> Room | None:
    """The pending attempt whose tag this room's name carries, if any."""
    settings = get_settings()
    head = room_name.lstrip("/")
    prefix = f"{settings.room_prefix}-"
    if not head.startswith(prefix):
        return None
    tag = head[len(prefix) : len(prefix) + lifecycle.TAG_LENGTH]
    return session.execute(select(Room).where(Room.tag == tag)).scalar_one_or_none()


def _adopt_pending(
    session: Session, room: Room, found: whereby.Meeting, now: datetime, after: AfterCommit
) -> str | None:
    """A room made by an attempt whose reply was lost: keep it if its meeting still waits for it.

    Returns "adopted", "retired" (made live only to be deleted), "running" (an attempt holds the
    meeting and will look the room up itself), or None when the room is no attempt's of ours.
    """
    meeting = session.get(Meeting, room.meeting_pk)
    if room.state != RoomState.PENDING or meeting is None:
        return None
    if meeting.claim_until is not None and meeting.claim_until > now:
        return "running"
    _fill_room(room, found, now)
    assert room.id is not None
    if (
        meeting.state == MeetingState.CREATING
        and meeting.room_id is None
        and lifecycle.covers(room.end_date, meeting.room_end)
    ):
        meeting.room_id = room.id
        meeting.due_at = None
        meeting.next_attempt_at = None
        meeting.last_error = None
        meeting.updated_at = now
        _release(meeting)
        room.due_at = meeting.room_end
        set_state(session, meeting, MeetingState.READY, f"reconciler adopted room {found.meeting_id}")
        emit(session, meeting, room, "room.replaced" if meeting.replacing else "room.ready", now)
        meeting.replacing = False
        outcome = "adopted"
    else:
        room.due_at = now
        room.retired_reason = "unwanted"
        note(
            session, meeting.booking_id, "note", f"reconciler retires room {found.meeting_id}", meeting.state
        )
        outcome = "retired"
    after.rooms.add(room.id)
    return outcome


def _room_lost(session: Session, room: Room, now: datetime, after: AfterCommit) -> None:
    meeting = session.get(Meeting, room.meeting_pk)
    room.state = RoomState.DELETED
    room.deleted_at = now
    room.due_at = None
    _release(room)
    if meeting is None:
        return
    note(
        session,
        meeting.booking_id,
        "note",
        f"room {room.whereby_id} is gone from Whereby",
        "found by the reconciler",
    )
    log.warning("booking %s: room %s is gone from Whereby", meeting.booking_id, room.whereby_id)
    if meeting.room_id != room.id:
        return
    meeting.room_id = None
    meeting.updated_at = now
    if meeting.state in (MeetingState.READY, MeetingState.DELETING) and meeting.room_end > now:
        meeting.replacing = True
        meeting.attempts = 0
        meeting.due_at = now
        assert meeting.id is not None
        after.meetings.add(meeting.id)
        set_state(session, meeting, MeetingState.CREATING, "room vanished before the end: replacing it")
    elif meeting.state in (MeetingState.READY, MeetingState.DELETING):
        set_state(session, meeting, MeetingState.ENDED, "room vanished after the end")
        emit(session, meeting, None, "room.deleted", now)
    elif meeting.state == MeetingState.CANCELLED:
        emit(session, meeting, None, "room.deleted", now)


# --------------------------------------------------------------------------------------------
# Operator queries (CLI).


def history(booking_id: str) -> list[History]:
    with session_scope() as session:
        return list(
            session.execute(
                select(History).where(History.booking_id == booking_id).order_by(col(History.id))
            ).scalars()
        )


def retry_failed(booking_ids: Sequence[str] | None) -> list[str]:
    """Put failed meetings back to be tried afresh (all of them when booking_ids is None)."""
    now = utcnow()
    after = AfterCommit()
    retried = []
    with session_scope() as session:
        query = select(Meeting).where(Meeting.state == MeetingState.FAILED)
        if booking_ids is not None:
            query = query.where(col(Meeting.booking_id).in_(list(booking_ids)))
        for meeting in session.exec(query):
            if meeting.room_end <= now:
                note(session, meeting.booking_id, "note", "not retried: the meeting is over")
                continue
            meeting.attempts = 0
            meeting.next_attempt_at = None
            meeting.last_error = None
            meeting.due_at = max(meeting.create_at, now)
            meeting.updated_at = now
            _release(meeting)
            set_state(session, meeting, MeetingState.SCHEDULED, "retried by an operator")
            assert meeting.id is not None
            after.meetings.add(meeting.id)
            retried.append(meeting.booking_id)
    after.run()
    return retried


def list_meetings(state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    with session_scope() as session:
        query = select(Meeting).order_by(col(Meeting.start)).limit(limit)
        if state:
            query = query.where(Meeting.state == state)
        meetings = list(session.execute(query).scalars())
        return [view(m, _current_room(session, m)) for m in meetings]
