"""calendar feeds and the occurrences they hold

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.store.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> worker.store.models.UTCDateTime:
    return worker.store.models.UTCDateTime()


def upgrade() -> None:
    op.create_table(
        "feed",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("match", sa.Text(), nullable=True),
        sa.Column("horizon_days", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("room", sa.JSON(), nullable=False),
        sa.Column("notify", sa.JSON(), nullable=True),
        sa.Column("username", sa.String(length=200), nullable=True),
        sa.Column("password_env", sa.String(length=200), nullable=True),
        sa.Column("password_enc", sa.Text(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("next_poll_at", _ts(), nullable=True),
        sa.Column("claim_token", sa.String(length=40), nullable=True),
        sa.Column("claim_until", _ts(), nullable=True),
        sa.Column("etag", sa.Text(), nullable=True),
        sa.Column("last_modified", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("last_poll_at", _ts(), nullable=True),
        sa.Column("last_outcome", sa.String(length=32), nullable=True),
        sa.Column("last_detail", sa.Text(), nullable=True),
        sa.Column("last_changes", sa.JSON(), nullable=True),
        sa.Column("occurrence_count", sa.Integer(), nullable=False),
        sa.Column("downloads", sa.Integer(), nullable=False),
        sa.Column("not_modified", sa.Integer(), nullable=False),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "feed_occurrence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("feed_id", sa.Integer(), nullable=False),
        sa.Column("booking_id", sa.String(length=200), nullable=False),
        sa.Column("start", _ts(), nullable=False),
        sa.Column("end", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("booking_id"),
    )
    op.create_index("ix_feed_occurrence_feed", "feed_occurrence", ["feed_id"])


def downgrade() -> None:
    op.drop_index("ix_feed_occurrence_feed", table_name="feed_occurrence")
    op.drop_table("feed_occurrence")
    op.drop_table("feed")
