"""indexes retention prunes by (expand only: nothing dropped or renamed)

Revision ID: 0008
Revises: 0007

Release 0007's processes keep working on this schema: only indexes are added. On PostgreSQL they
are built CONCURRENTLY, outside a transaction, so writers (deletions due now) are never held up
while a large table is indexed; IF NOT EXISTS lets a run that was interrupted be run again.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_meeting_state_end", "meeting", ["state", "end"]),
    ("ix_outbox_booking_id", "outbox", ["booking_id"]),
    ("ix_outbox_sent_at", "outbox", ["sent_at"]),
    ("ix_event_delivery_booking_id", "event_delivery", ["booking_id"]),
    ("ix_event_delivery_finished", "event_delivery", ["state", "finished_at"]),
    ("ix_webhook_event_received_at", "webhook_event", ["received_at"]),
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            for name, table, columns in INDEXES:
                op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)
    else:
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns, if_not_exists=True)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table, if_exists=True)
