"""deployment: this deployment's identity, carried in every room name it makes; drop the unused
next_attempt_at columns (the retry instant has always been due_at)

Revision ID: 0003
Revises: 0002
"""

import secrets
import string
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.store.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in worker.store.deployment, frozen here: a migration must not change when the code does.
ALPHABET = string.ascii_lowercase + string.digits
LENGTH = 5


def upgrade() -> None:
    deployment = op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("identity", sa.String(length=16), nullable=False),
        sa.Column("created_at", worker.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    identity = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    op.bulk_insert(deployment, [{"id": 1, "identity": identity, "created_at": worker.store.models.utcnow()}])
    for table in ("meeting", "room"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("next_attempt_at")


def downgrade() -> None:
    for table in ("meeting", "room"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("next_attempt_at", worker.store.models.UTCDateTime(), nullable=True))
    op.drop_table("deployment")
