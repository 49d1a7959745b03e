"""outbox: a partial index of the unsent events, in id order, instead of an index on `pending`

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in worker.store.models.UNSENT, frozen here: a migration must not change when the models do.
UNSENT = {"sqlite": "pending IS 1", "postgresql": "pending IS true"}


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_pending")
        batch_op.create_index(
            "ix_outbox_unsent",
            ["id"],
            unique=False,
            sqlite_where=sa.text(UNSENT["sqlite"]),
            postgresql_where=sa.text(UNSENT["postgresql"]),
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_unsent")
        batch_op.create_index("ix_outbox_pending", ["pending"], unique=False)
