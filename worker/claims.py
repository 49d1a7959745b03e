"""Claims: the conditional updates that make a second delivery a no-op, and their lease renewal.

A row's `claim_token` says who holds it: the dispatcher (`d…`: a message was sent, not started),
the recovery pass (`o…`: the message was sent again, not started) or a running task (`r…`).
`claim_until` is the lease; a holder that dies stops renewing it, and the work is picked up again
one lease later.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Row, update
from sqlmodel import Session, col

from config.settings import Settings, SettingsError, get_settings
from worker import runtime
from worker.models import Meeting, Room, utcnow
from worker.store import session_scope

log = logging.getLogger(__name__)

DISPATCH_CLAIM, RESEND_CLAIM, RUN_CLAIM = "d", "o", "r"
M = TypeVar("M", Meeting, Room)


def take(
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


def holds(row: Meeting | Room, run: str) -> bool:
    return row.claim_token == run


class Renewer:
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
        thread = threading.current_thread()
        # A reset (a fork, a test changing the settings) starts a new thread when one is needed:
        # this one then stops instead of renewing beside it.
        while self._thread is thread:
            try:
                lease = get_settings().claim_lease_seconds
            except SettingsError:  # settings made invalid under us (tests do): try again shortly
                lease = 3.0
            time.sleep(lease / 3)
            with self._lock:
                held = list(self._held)
            if held and self._thread is thread:
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


renewer = Renewer()


@runtime.on_reset("claim renewer")
def _forget_renewals() -> None:
    # A forked child has no renewer thread, and may have copied a lock some thread held.
    renewer.__init__()  # type: ignore[misc]
