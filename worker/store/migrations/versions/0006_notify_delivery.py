"""events delivered to notify URLs (signed POSTs, retried, recorded)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.store.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> worker.store.models.UTCDateTime:
    return worker.store.models.UTCDateTime()


def upgrade() -> None:
    op.create_table(
        "event_delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("booking_id", sa.String(length=200), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("due_at", _ts(), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claim_token", sa.String(length=40), nullable=True),
        sa.Column("claim_until", _ts(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("delivery_id"),
    )
    for name, columns in (
        ("ix_event_delivery_pending", ["booking_id", "id"]),
        ("ix_event_delivery_due", ["due_at"]),
    ):
        op.create_index(
            name,
            "event_delivery",
            columns,
            sqlite_where=sa.text("pending IS 1"),
            postgresql_where=sa.text("pending IS true"),
        )


def downgrade() -> None:
    op.drop_index("ix_event_delivery_due", table_name="event_delivery")
    op.drop_index("ix_event_delivery_pending", table_name="event_delivery")
    op.drop_table("event_delivery")
