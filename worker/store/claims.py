"""Claims: who may act on a row now, and the leases that say its message or its run is alive.

A message about a row (`rooms.create_room`, `rooms.delete_room`) means "look at this row now". The
first copy to start while the row is due and no live run holds it does the work; every other copy,
early or late, is a cheap no-op. Re-sending a row therefore never spoils a copy already queued.

A row's `claim_token` says who holds it: the dispatcher (`d…`: a message was sent), the recovery
pass (`o…`: the message was sent again) or a running task (`r…`). `claim_until` is the lease. A
worker renews the lease of every message it holds (received, waiting for its ETA or a free thread)
and of every run it is doing, each third of a lease; a worker that dies stops renewing, and the
dispatcher sends the row again one lease later. A message that no worker ever received (lost with
the broker, or sent while no worker runs) lapses the same way. The leases themselves are taken,
renewed and released by `worker/store/leases.py`, as every other lease in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, and_, not_, or_
from sqlmodel import Session, col

from config.settings import Settings, SettingsError, get_settings
from worker.rules.facts import EARLY_SLACK
from worker.runtime import resources
from worker.store import leases, session_scope
from worker.store.models import Meeting, Room, utcnow

log = logging.getLogger(__name__)

DISPATCH_CLAIM, RESEND_CLAIM, RUN_CLAIM = "d", "o", "r"
M = TypeVar("M", Meeting, Room)


def takeable(model: type[M], now: datetime) -> ColumnElement[bool]:
    """A row a delivered message may act on: its work is due and no live run holds it (none has
    started, or the one that did stopped renewing its lease)."""
    return and_(
        col(model.due_at).is_not(None),
        col(model.due_at) <= now + EARLY_SLACK,
        or_(
            col(model.claim_token).is_(None),
            not_(col(model.claim_token).startswith(RUN_CLAIM)),
            col(model.claim_until) < now,
        ),
    )


def take(session: Session, model: type[M], pk: int, settings: Settings, *columns: Any) -> Row[Any] | None:
    """Start a run on the row if a message may act on it now; None when there is nothing to do
    (done, not due, or another copy of the message is running it).

    One lease taken (`worker/store/leases.py`): the row's new `claim_token` (the run's) and `columns`."""
    now = utcnow()
    taken = leases.take(
        session,
        model,
        col(model.id) == pk,
        takeable(model, now),
        now + timedelta(seconds=settings.claim_lease_seconds),
        token=leases.new_token(RUN_CLAIM),
        returning=(col(model.claim_token), *columns),
    )
    return taken[0] if taken else None


NOTHING_TO_DO = "skipped: not due, or done, or running (a copy of this message)"


def holds(row: Meeting | Room, run: str) -> bool:
    return row.claim_token == run


Key = tuple[type[Meeting] | type[Room], int, str]


class Renewer:
    """Keeps the leases of this process's messages and runs alive: one thread renews them all, in
    one transaction, each third of a lease. A dead process stops renewing, so its work is sent
    again one lease later instead of after any fixed worst case, and work merely waiting behind a
    backlog in a live worker is never sent twice."""

    def __init__(self) -> None:
        # (model, pk, token): the token is part of the key, so a late finisher and the run that
        # took its claim over, both in this process, never drop each other's renewal.
        self._held: set[Key] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, key: Key) -> None:
        resources.own("claim renewer", lambda: self, _forget)  # a reset starts it afresh
        with self._lock:
            self._held.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="claim-renewer", daemon=True)
                self._thread.start()

    def release(self, key: Key) -> None:
        with self._lock:
            self._held.discard(key)

    def release_messages(self) -> None:
        """Let go of every message held here (the runs stay held)."""
        with self._lock:
            self._held = {key for key in self._held if key[2].startswith(RUN_CLAIM)}

    @contextmanager
    def holding(self, model: type[M], pk: int, token: str) -> Iterator[None]:
        key: Key = (model, pk, token)
        self.hold(key)
        try:
            yield
        finally:
            self.release(key)

    def held(self) -> list[Key]:
        with self._lock:
            return list(self._held)

    def _run(self) -> None:
        thread = threading.current_thread()
        # A reset (a fork, a test changing the settings) starts a new thread when one is needed:
        # this one then stops instead of renewing beside it.
        while self._thread is thread:
            try:
                lease = get_settings().claim_lease_seconds
            except SettingsError:  # settings made invalid under us (tests do): try again shortly
                lease = 3.0
            time.sleep(lease / 3)
            held = self.held()
            if held and self._thread is thread:
                began = time.monotonic()
                try:
                    self.renew(held, lease)
                except Exception:  # the next round, or the lease running out, settles it
                    log.exception("renewing %d claims failed", len(held))
                took = time.monotonic() - began
                if took > lease / 3:
                    log.warning(
                        "renewing %d leases took %.2f s (the lease is %.0f s)", len(held), took, lease
                    )

    def renew(self, held: Sequence[Key], lease: float) -> None:
        """Renew every lease held here. A message whose row moved on (a copy started it, it was
        rescheduled or cancelled) matches nothing and is forgotten: nothing is held for it now."""
        until = utcnow() + timedelta(seconds=lease)
        alive: set[Key] = set()
        with session_scope() as session:
            for model in (Meeting, Room):
                keys = [(pk, token) for kind, pk, token in held if kind is model]
                alive.update((model, pk, token) for pk, token in leases.renew(session, model, keys, until))
        gone = {key for key in held if key not in alive and not key[2].startswith(RUN_CLAIM)}
        if gone:
            with self._lock:
                self._held -= gone


renewer = Renewer()


def message_received(model: type[Meeting] | type[Room], pk: int, claim: str) -> None:
    """A worker received a message about the row (it may wait for its ETA or a free thread): keep
    the row's lease alive while the message lives in this process."""
    if claim.startswith((DISPATCH_CLAIM, RESEND_CLAIM)):
        renewer.hold((model, pk, claim))


@contextmanager
def message(model: type[Meeting] | type[Room], pk: int, claim: str) -> Iterator[None]:
    """The run of a received message: once it has tried to take the row, the message is spent."""
    try:
        yield
    finally:
        renewer.release((model, pk, claim))


def _forget(held: Renewer) -> None:
    # A forked child has no renewer thread, and may have copied a lock some thread held.
    held.__init__()  # type: ignore[misc]
