"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 19:44:43.275998
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import worker.store.models


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('history',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('booking_id', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=120), nullable=False),
    sa.Column('outcome', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('history', schema=None) as batch_op:
        batch_op.create_index('ix_history_booking_at', ['booking_id', 'id'], unique=False)

    op.create_table('meeting',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('booking_id', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('start', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('end', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('create_at', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('room_end', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('room_options', sa.JSON(), nullable=False),
    sa.Column('notify', sa.JSON(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('room_id', sa.Integer(), nullable=True),
    sa.Column('due_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('replacing', sa.Boolean(), nullable=False),
    sa.Column('claim_token', sa.String(length=36), nullable=True),
    sa.Column('claim_until', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', worker.store.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('booking_id')
    )
    with op.batch_alter_table('meeting', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_meeting_due_at'), ['due_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_meeting_state'), ['state'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('booking_id', sa.String(length=200), nullable=False),
    sa.Column('task', sa.String(length=200), nullable=False),
    sa.Column('queue', sa.String(length=200), nullable=False),
    sa.Column('kwargs', sa.JSON(), nullable=False),
    sa.Column('sent_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('pending', sa.Boolean(), nullable=False),
    sa.Column('claim_until', worker.store.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_pending'), ['pending'], unique=False)

    op.create_table('room',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('meeting_pk', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=16), nullable=False),
    sa.Column('name_prefix', sa.String(length=39), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('whereby_id', sa.String(length=64), nullable=True),
    sa.Column('room_name', sa.String(length=255), nullable=True),
    sa.Column('room_url', sa.Text(), nullable=True),
    sa.Column('host_room_url', sa.Text(), nullable=True),
    sa.Column('viewer_room_url', sa.Text(), nullable=True),
    sa.Column('end_date', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('due_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('retired_reason', sa.String(length=32), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('claim_token', sa.String(length=36), nullable=True),
    sa.Column('claim_until', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', worker.store.models.UTCDateTime(), nullable=False),
    sa.Column('ready_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.Column('deleted_at', worker.store.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['meeting_pk'], ['meeting.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tag')
    )
    with op.batch_alter_table('room', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_room_due_at'), ['due_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_room_meeting_pk'), ['meeting_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_room_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_room_whereby_id'), ['whereby_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('room', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_room_whereby_id'))
        batch_op.drop_index(batch_op.f('ix_room_state'))
        batch_op.drop_index(batch_op.f('ix_room_meeting_pk'))
        batch_op.drop_index(batch_op.f('ix_room_due_at'))

    op.drop_table('room')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_pending'))

    op.drop_table('outbox')
    with op.batch_alter_table('meeting', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_meeting_state'))
        batch_op.drop_index(batch_op.f('ix_meeting_due_at'))

    op.drop_table('meeting')
    with op.batch_alter_table('history', schema=None) as batch_op:
        batch_op.drop_index('ix_history_booking_at')

    op.drop_table('history')
