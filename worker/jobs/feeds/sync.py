"""Feeds as a source of bookings: a feed's sync, and beat's poll (CONTRACT §5; the feeds themselves
are added, shown and removed by `worker/jobs/feeds/registry.py`).

A sync reads the feed (a conditional GET: a 304 reuses the last good body), expands the
occurrences of [now, now + horizon], and compares them with the occurrences it booked before:
a new one is booked (`schedule_meeting`), a moved one booked again (a reschedule), one that a
complete, successful read no longer holds (deleted, or cancelled) is cancelled (`cancel_meeting`).

Nothing changes when the read fails (error, timeout, non-2xx), answers HTML or anything that is not
a complete VCALENDAR, or suddenly loses most of its occurrences (more than `MASS_LOSS_MIN` and more
than half of those booked in the horizon vanish at once, with the new count under half the old;
`worker/rules/feeds.py` decides):
the poll is recorded (`last_outcome` `failed` or `suspicious`, the feed's history, a log line) and,
when the feed was not in that state already, the event `feed.failed` / `feed.suspicious` goes to the
feed's notify, with `booking_id` `feed:{NAME}`; the first ok poll after them sends `feed.recovered`.
`feeds sync NAME --force` accepts such a loss. A sync that passes its deadline
(ROOMKEEPER_FEED_SYNC_DEADLINE_SECONDS) changes nothing either, and is reported the same way; what
the feed limits (`worker/adapters/calendars/limits.py`) leave out is booked never, and reported in the detail.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import or_, update
from sqlmodel import col, delete, select

from config.settings import get_settings
from worker.adapters import outbound
from worker.adapters.calendars import expand, limits, source
from worker.jobs import booking
from worker.jobs.feeds import registry
from worker.rules import feeds as rules
from worker.rules.lifecycle import fmt
from worker.rules.validation import (
    InvalidRequest,
    ScheduleRequest,
)
from worker.store import journal, leases, session_scope
from worker.store.models import EventDelivery, Feed, FeedOccurrence, Outbox, utcnow

log = logging.getLogger(__name__)

CLAIM_LEASE_SECONDS = 300


# ---------------------------------------------------------------------------------------------
# Sync


def _claim(name: str, now: datetime) -> tuple[int, str] | None:
    """Lease the feed for one sync; None when another sync holds it."""
    token = leases.new_token()
    with session_scope() as session:
        feed = registry.known(session, name)
        assert feed.id is not None
        taken = leases.take(
            session,
            Feed,
            col(Feed.id) == feed.id,
            leases.lapsed(Feed, now),
            now + timedelta(seconds=CLAIM_LEASE_SECONDS),
            token=token,
        )
        return (feed.id, token) if taken else None


def _event(session: Any, feed: Feed, event: str, detail: str, now: datetime) -> None:
    """A feed event to the feed's notify, sent once this transaction commits."""
    if not feed.notify:
        return
    kwargs = {
        "event": event,
        "booking_id": f"feed:{feed.name}",
        "feed": feed.name,
        "detail": detail,
        "occurred_at": fmt(now),
    }
    url = feed.notify.get("url")
    if url:
        session.add(EventDelivery(**journal.delivery_row(f"feed:{feed.name}", event, url, kwargs, now)))
        task, queue, kwargs = journal.DELIVER_TASK, get_settings().queue, {"booking_id": f"feed:{feed.name}"}
    else:
        task, queue = feed.notify["task"], feed.notify["queue"]
    session.add(
        Outbox(
            created_at=now,
            booking_id=f"feed:{feed.name}",
            task=task,
            queue=queue,
            kwargs=kwargs,
            pending=True,
        )
    )


def _finish(
    feed_id: int,
    token: str,
    now: datetime,
    outcome: str,
    detail: str,
    changes: dict[str, Any] | None,
    *,
    fetched: source.Fetched | None = None,
    count: int | None = None,
) -> dict[str, Any]:
    settings = get_settings()
    with session_scope() as session:
        feed = session.get(Feed, feed_id)
        if feed is None:  # removed while syncing
            return {"outcome": "removed"}
        # Quiet while broken: the event goes once when the feed starts failing (or turns from failed
        # to suspicious, or back), and `feed.recovered` once when a poll is ok again; the polls in
        # between are recorded (history, log) but send nothing.
        event = rules.feed_event(feed.last_outcome, outcome)
        feed.last_poll_at = now
        feed.last_outcome = outcome
        feed.last_detail = detail
        if changes is not None:
            feed.last_changes = changes
        if count is not None:
            feed.occurrence_count = count
        if fetched is not None:
            if fetched.modified:
                feed.downloads += 1
                feed.body = fetched.keep if fetched.keep is not None else fetched.text
                feed.etag = fetched.etag
                feed.last_modified = fetched.last_modified
            else:
                feed.not_modified += 1
        entry = {"at": fmt(now), "outcome": outcome, "detail": detail, "changes": changes}
        feed.history = [*(feed.history or []), entry][-registry.HISTORY_KEEP :]
        leases.release(session, Feed, feed_id, token)
        # Cache-Control: max-age: the source asks not to be read again before then.
        max_age = fetched.max_age if fetched is not None else None
        feed.next_poll_at = rules.next_poll(
            feed.next_poll_at, now, settings.feed_poll_interval_seconds, max_age
        )
        if event is not None:
            _event(session, feed, event, detail, now)
        result = registry.describe(feed)
    if outcome in rules.UNHEALTHY:
        log.warning("feed %s: %s, nothing changed: %s", result["name"], outcome, detail)
    else:
        log.info("feed %s: %s: %s", result["name"], outcome, detail)
    if event is not None:
        (log.info if event == "feed.recovered" else log.warning)("feed %s: %s", result["name"], event)
        from worker.jobs import outbox

        outbox.flush_outbox()
    return result


def sync_feed(name: str, *, now: datetime | None = None, force: bool = False) -> dict[str, Any]:
    """One poll of the feed; returns its view with `last_outcome`: ok, failed, suspicious, or busy
    (another sync holds the feed's claim)."""
    now = now or utcnow()
    claimed = _claim(name, now)
    if claimed is None:
        log.info("feed %s: busy, another sync holds it", name)
        return {"name": name, "last_outcome": "busy"}
    feed_id, token = claimed
    try:
        return _sync(feed_id, token, now, force)
    except Exception:
        # Unexpected: release the claim for the next poll, and let the caller see the error.
        with session_scope() as session:
            leases.release(session, Feed, feed_id, token)
        raise


def _sync(feed_id: int, token: str, now: datetime, force: bool) -> dict[str, Any]:
    settings = get_settings()
    with session_scope() as session:
        feed = session.get(Feed, feed_id)
        assert feed is not None
        snapshot = (feed.name, feed.url, feed.kind, feed.match, feed.horizon_days, feed.timezone)
        room, notify, username, password_env = feed.room, feed.notify, feed.username, feed.password_env
        password_enc = feed.password_enc
        etag, last_modified, body = feed.etag, feed.last_modified, feed.body
        stored = {
            row.booking_id: (row.start, row.end)
            for row in session.execute(
                select(FeedOccurrence).where(FeedOccurrence.feed_id == feed_id)
            ).scalars()
        }
    name, url, kind, match, horizon_days, timezone = snapshot
    # One hard deadline for the whole read: the fetch's every socket operation is cut at it, and
    # the expansion checks it between units of work that the limits keep small. Past it, nothing
    # is changed (the bookings below are made only once the whole read is in hand).
    deadline = limits.Deadline(settings.feed_sync_deadline_seconds)
    try:
        if kind == "caldav":
            fetched = source.fetch_caldav(
                url,
                settings,
                username,
                password_env,
                registry.password_of(password_enc),
                deadline=deadline.at,
                version=etag,
                body=body,
            )
        else:
            fetched = source.fetch_ics(
                url,
                settings,
                etag=etag if body is not None else None,
                last_modified=last_modified if body is not None else None,
                deadline=deadline.at,
            )
        text = fetched.text if fetched.text is not None else body
        assert text is not None
        if len(text) > limits.MAX_BODY_BYTES:  # a body stored before the bound existed
            raise source.FetchError(f"the feed is larger than {limits.MAX_BODY_BYTES} bytes")
        deadline.check("downloading")
        calendar = expand.parse(text)
        deadline.check("parsing")
        window_end = now + timedelta(days=horizon_days)
        expansion = expand.expand(
            calendar, name, now, window_end, match=match, timezone=timezone, deadline=deadline
        )
        wanted = expansion.found
        deadline.check("expanding")
    except (source.FetchError, expand.FeedContentError, limits.DeadlinePassed) as exc:
        return _finish(feed_id, token, now, "failed", str(exc), None)
    except Exception as exc:  # anything the expansion trips on: the read is not trusted
        log.exception("feed %s: could not be expanded", name)
        return _finish(
            feed_id, token, now, "failed", f"the feed could not be expanded: {type(exc).__name__}", None
        )

    spans = {bid: (occurrence.start, occurrence.end) for bid, occurrence in wanted.items()}
    plan = rules.compare(stored, spans, now)
    live, ended, gone = plan.live, plan.ended, plan.gone
    if rules.suspicious(len(live), len(gone), len(wanted), force):
        detail = (
            f"{len(gone)} of the {len(live)} booked occurrences vanished at once; "
            "nothing was changed (sync with --force to accept)"
        )
        return _finish(feed_id, token, now, "suspicious", detail, None, fetched=fetched)

    changes = {
        "booked": 0,
        "rescheduled": 0,
        "cancelled": 0,
        "unchanged": 0,
        "refused": 0,
        "skipped_series": expansion.skipped_series,
        "skipped_occurrences": expansion.skipped_occurrences,
    }
    keep: dict[str, tuple[datetime, datetime]] = {}
    refused: list[str] = []
    for bid, action in plan.actions:
        occurrence, old = wanted[bid], live.get(bid)
        if action == "unchanged" and old is not None:
            changes["unchanged"] += 1
            keep[bid] = old
            continue
        request = {
            "booking_id": bid,
            "start": occurrence.start.isoformat(),
            "end": occurrence.end.isoformat(),
            "room": room,
            "notify": notify,
            "metadata": {"feed": name, "uid": occurrence.uid[:500], "summary": occurrence.summary[:500]},
        }
        try:
            booking.schedule_meeting(
                ScheduleRequest.model_validate(
                    request, context={"settings": settings, "now": utcnow(), "check_url": outbound.check_url}
                )
            )
        except (ValidationError, InvalidRequest) as exc:
            changes["refused"] += 1
            refused.append(f"{bid}: {str(exc).splitlines()[0][:200]}")
            if old is not None:
                keep[bid] = old
            continue
        changes["booked" if action == "book" else "rescheduled"] += 1
        keep[bid] = spans[bid]
    for bid in gone:
        registry.cancel_booking(bid)
        changes["cancelled"] += 1

    with session_scope() as session:
        if session.get(Feed, feed_id) is None:  # removed while this sync ran: keep no orphan rows
            return {"name": name, "last_outcome": "removed"}
        session.execute(delete(FeedOccurrence).where(col(FeedOccurrence.feed_id) == feed_id))
        for bid, (start, end) in keep.items():
            session.add(FeedOccurrence(feed_id=feed_id, booking_id=bid, start=start, end=end))
    read = fetched.how if fetched.modified else f"{fetched.how}, re-expanded"
    if fetched.max_age is not None:
        read += f", fresh for {fetched.max_age} s (Cache-Control)"
    detail = (
        f"{read}; {len(wanted)} occurrence(s) in the horizon: {changes['booked']} booked, "
        f"{changes['rescheduled']} rescheduled, {changes['cancelled']} cancelled, {len(ended)} ended"
    )
    if expansion.notes:
        detail += f"; skipped (feed limits): {'; '.join(expansion.notes[:5])}"
    if refused:
        detail += f"; refused: {'; '.join(refused[:5])}"
    return _finish(feed_id, token, now, "ok", detail, changes, fetched=fetched, count=len(keep))


def poll_due(send: Any) -> list[str]:
    """Beat's pass: for each feed due, move its next poll one interval on (a conditional update, so
    two passes never both send it) and `send(name)` one sync task."""
    now = utcnow()
    interval = timedelta(seconds=get_settings().feed_poll_interval_seconds)
    sent: list[str] = []
    with session_scope() as session:
        due = list(
            session.execute(
                select(Feed.id, Feed.name, Feed.next_poll_at).where(
                    or_(col(Feed.next_poll_at).is_(None), col(Feed.next_poll_at) <= now)
                )
            ).all()
        )
    for feed_id, name, next_poll_at in due:
        with session_scope() as session:
            condition = (
                col(Feed.next_poll_at).is_(None)
                if next_poll_at is None
                else col(Feed.next_poll_at) == next_poll_at
            )
            moved = session.connection().execute(
                update(Feed).where(col(Feed.id) == feed_id, condition).values(next_poll_at=now + interval)
            )
            if moved.rowcount != 1:
                continue
        send(name)
        sent.append(name)
    return sent
