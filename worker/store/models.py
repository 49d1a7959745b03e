"""The store's tables: meetings, the Whereby rooms made for them, their history, and the event outbox."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, String, Text, TypeDecorator, text
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

# The states live with the rules (which are pure); the store keeps them under these names too.
from worker.rules.states import TERMINAL_STATES as TERMINAL_STATES
from worker.rules.states import MeetingState as MeetingState
from worker.rules.states import RoomState as RoomState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (SQLite has no zones) and always hands back aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Meeting(SQLModel, table=True):
    __tablename__ = "meeting"
    # Retention (worker/jobs/retention.py) finds the finished meetings whose end is long past by a range
    # scan of this index, one state at a time, however many meetings are stored.
    __table_args__ = (Index("ix_meeting_state_end", "state", "end"),)

    id: int | None = Field(default=None, primary_key=True)
    booking_id: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    state: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    start: datetime = _ts(nullable=False)
    end: datetime = _ts(nullable=False)
    # Derived from start/end and the lead and grace settings when the meeting was last scheduled.
    create_at: datetime = _ts(nullable=False)
    room_end: datetime = _ts(nullable=False)
    room_options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    notify: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    room_id: int | None = None  # the current room (no FK: room already points back here)
    # The next creation work is due at due_at; NULL when there is none (indexed: due work is found
    # by a range scan over this column, so its cost follows the due rows, not the stored ones).
    due_at: datetime | None = _ts(index=True)
    attempts: int = 0
    replacing: bool = False
    claim_token: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    claim_until: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class Room(SQLModel, table=True):
    __tablename__ = "room"

    id: int | None = Field(default=None, primary_key=True)
    meeting_pk: int = Field(foreign_key="meeting.id", index=True)
    tag: str = Field(sa_column=Column(String(16), nullable=False, unique=True))
    name_prefix: str = Field(sa_column=Column(String(39), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    whereby_id: str | None = Field(default=None, sa_column=Column(String(64), index=True))
    room_name: str | None = Field(default=None, sa_column=Column(String(255)))
    room_url: str | None = Field(default=None, sa_column=Column(Text))
    host_room_url: str | None = Field(default=None, sa_column=Column(Text))
    viewer_room_url: str | None = Field(default=None, sa_column=Column(Text))
    end_date: datetime = _ts(nullable=False)
    # Deletion is due at due_at; NULL while none is planned.
    due_at: datetime | None = _ts(index=True)
    retired_reason: str | None = Field(default=None, sa_column=Column(String(32)))
    attempts: int = 0
    claim_token: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    claim_until: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(nullable=False)
    ready_at: datetime | None = _ts()
    deleted_at: datetime | None = _ts()
    # Who is in the room, from Whereby's webhooks (CONTRACT §4.3); NULL while no event told.
    participants: int | None = None
    occupancy_since: datetime | None = _ts()  # when the room last went from empty to occupied or back
    occupancy_at: datetime | None = _ts()  # createdAt of the newest event applied: older ones are ignored
    # Set when the meeting's end came with people inside: the deletion is held (CONTRACT §4.3).
    overrun_since: datetime | None = _ts()


class WebhookEvent(SQLModel, table=True):
    """Whereby's webhooks as received: stored by the web process, applied by a worker."""

    __tablename__ = "webhook_event"
    # A room's events are found by its Whereby id; the unapplied ones (beat's sweep) through a
    # partial index that holds only them, so the sweep's cost follows the backlog, not the table.
    __table_args__ = (
        Index("ix_webhook_event_whereby_id", "whereby_id"),
        Index(
            "ix_webhook_event_unapplied",
            "received_at",
            sqlite_where=text("applied_at IS NULL"),
            postgresql_where=text("applied_at IS NULL"),
        ),
        Index("ix_webhook_event_received_at", "received_at"),  # retention: the oldest first
    )

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    type: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _ts(nullable=False)  # the event's own createdAt
    received_at: datetime = _ts(nullable=False)
    whereby_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    room_name: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    num_clients: int | None = None
    applied_at: datetime | None = _ts()
    outcome: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))


class History(SQLModel, table=True):
    """Append-only: every state change and every Whereby call, to answer "what happened to X"."""

    __tablename__ = "history"
    __table_args__ = (Index("ix_history_booking_at", "booking_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(nullable=False)
    booking_id: str = Field(sa_column=Column(String(200), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))  # state | whereby | event | note
    action: str = Field(sa_column=Column(String(120), nullable=False))
    outcome: str = Field(default="", sa_column=Column(Text, nullable=False))


# The partial index's predicate, as each dialect renders the flush's `Outbox.pending.is_(True)`:
# a planner uses a partial index only when the query states its predicate.
UNSENT = {"sqlite": "pending IS 1", "postgresql": "pending IS true"}


class Outbox(SQLModel, table=True):
    """Events to send to a caller's notify task, written in the transaction of the change."""

    __tablename__ = "outbox"
    # A flush reads the oldest unsent rows in id order. This partial index holds only those rows,
    # in that order, so the read stays small however many were sent before, and the planner has
    # nothing better to choose even before it has statistics (a fresh restore or bulk import).
    __table_args__ = (
        Index(
            "ix_outbox_unsent",
            "id",
            sqlite_where=text(UNSENT["sqlite"]),
            postgresql_where=text(UNSENT["postgresql"]),
        ),
        # Retention: a pruned booking's rows, and the rows sent long ago.
        Index("ix_outbox_booking_id", "booking_id"),
        Index("ix_outbox_sent_at", "sent_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _ts(nullable=False)
    booking_id: str = Field(sa_column=Column(String(200), nullable=False))
    task: str = Field(sa_column=Column(String(200), nullable=False))
    queue: str = Field(sa_column=Column(String(200), nullable=False))
    kwargs: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    sent_at: datetime | None = _ts()
    pending: bool = True
    claim_until: datetime | None = _ts()


class Deployment(SQLModel, table=True):
    """One row: this deployment's identity, made once by `roomkeeper migrate` and carried in the
    name of every room it makes, so deployments sharing a Whereby organisation never touch each
    other's rooms."""

    __tablename__ = "deployment"

    id: int | None = Field(default=None, primary_key=True)
    identity: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = _ts(nullable=False)


class ApiToken(SQLModel, table=True):
    """A bearer token for the HTTP face (CONTRACT §4.2): only its SHA-256 is kept, never the token."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(100), nullable=False, unique=True))
    token_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_at: datetime = _ts(nullable=False)
    last_used_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"  # tried for ROOMKEEPER_NOTIFY_RETRY_HOURS, then given up


class EventDelivery(SQLModel, table=True):
    """An event for a caller's notify URL (CONTRACT §4.4): its signed POST, retries and outcome."""

    __tablename__ = "event_delivery"
    # Only pending rows are ever looked for: a booking's oldest (the head of its chain: events of
    # one booking go in order) and, for beat's sweep, those due. Partial indexes hold just them.
    __table_args__ = (
        Index(
            "ix_event_delivery_pending",
            "booking_id",
            "id",
            sqlite_where=text(UNSENT["sqlite"]),
            postgresql_where=text(UNSENT["postgresql"]),
        ),
        Index(
            "ix_event_delivery_due",
            "due_at",
            sqlite_where=text(UNSENT["sqlite"]),
            postgresql_where=text(UNSENT["postgresql"]),
        ),
        # Retention: a pruned booking's rows, and the finished rows by state and age.
        Index("ix_event_delivery_booking_id", "booking_id"),
        Index("ix_event_delivery_finished", "state", "finished_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # Sent as Roomkeeper-Delivery: the same on every attempt, so receivers can drop repeats.
    delivery_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    booking_id: str = Field(sa_column=Column(String(200), nullable=False))
    event: str = Field(sa_column=Column(String(64), nullable=False))
    url: str = Field(sa_column=Column(Text, nullable=False))  # may hold a secret in its query string
    body: str = Field(sa_column=Column(Text, nullable=False))  # the exact bytes signed and sent
    created_at: datetime = _ts(nullable=False)
    due_at: datetime = _ts(nullable=False)  # the next attempt
    pending: bool = True
    state: str = Field(sa_column=Column(String(16), nullable=False))
    attempts: int = 0
    claim_token: str | None = Field(default=None, sa_column=Column(String(40), nullable=True))
    claim_until: datetime | None = _ts()
    last_status: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    finished_at: datetime | None = _ts()


class Feed(SQLModel, table=True):
    """A calendar feed (CONTRACT §5): an ICS URL or a CalDAV calendar whose events become bookings.

    A CalDAV password is read from the environment variable named in `password_env` at each fetch,
    or kept encrypted with ROOMKEEPER_SECRET_KEY in `password_enc`. `body` is the last good read,
    re-expanded when the source answers 304 Not Modified, so the moving horizon is evaluated on every
    poll."""

    __tablename__ = "feed"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(50), nullable=False, unique=True))
    url: str = Field(sa_column=Column(Text, nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))  # "ics" or "caldav"
    match: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    horizon_days: int = 14
    timezone: str = Field(sa_column=Column(String(64), nullable=False))
    room: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    notify: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    username: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    password_env: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    # Or the password itself, encrypted with ROOMKEEPER_SECRET_KEY (Fernet); never shown.
    password_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(nullable=False)
    next_poll_at: datetime | None = _ts()
    claim_token: str | None = Field(default=None, sa_column=Column(String(40), nullable=True))
    claim_until: datetime | None = _ts()
    etag: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    last_modified: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    last_poll_at: datetime | None = _ts()
    last_outcome: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    last_detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    last_changes: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    occurrence_count: int = 0
    downloads: int = 0
    not_modified: int = 0
    # The latest polls, newest last (at most 50): {"at", "outcome", "detail", "changes"}.
    history: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class FeedOccurrence(SQLModel, table=True):
    """An occurrence a feed booked: what it was last booked as, to tell new, moved and gone apart."""

    __tablename__ = "feed_occurrence"
    __table_args__ = (Index("ix_feed_occurrence_feed", "feed_id"),)

    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(nullable=False)
    booking_id: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    start: datetime = _ts(nullable=False)
    end: datetime = _ts(nullable=False)
