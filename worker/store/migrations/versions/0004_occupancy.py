"""room occupancy (who is in each room, from Whereby's webhooks) and the webhook inbox

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.store.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> worker.store.models.UTCDateTime:
    return worker.store.models.UTCDateTime()


def upgrade() -> None:
    with op.batch_alter_table("room") as batch:
        batch.add_column(sa.Column("participants", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("occupancy_since", _ts(), nullable=True))
        batch.add_column(sa.Column("occupancy_at", _ts(), nullable=True))
        batch.add_column(sa.Column("overrun_since", _ts(), nullable=True))
    op.create_table(
        "webhook_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("whereby_id", sa.String(length=64), nullable=True),
        sa.Column("room_name", sa.String(length=255), nullable=True),
        sa.Column("num_clients", sa.Integer(), nullable=True),
        sa.Column("applied_at", _ts(), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_webhook_event_whereby_id", "webhook_event", ["whereby_id"])
    op.create_index(
        "ix_webhook_event_unapplied",
        "webhook_event",
        ["received_at"],
        sqlite_where=sa.text("applied_at IS NULL"),
        postgresql_where=sa.text("applied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_event_unapplied", table_name="webhook_event")
    op.drop_index("ix_webhook_event_whereby_id", table_name="webhook_event")
    op.drop_table("webhook_event")
    with op.batch_alter_table("room") as batch:
        for name in ("overrun_since", "occupancy_at", "occupancy_since", "participants"):
            batch.drop_column(name)
