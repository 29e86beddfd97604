"""health events, node records, user email

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 11:54:17.789729

Generated with alembic autogenerate against a database at 0001 (the inference tables that
autogenerate also saw belong to 0003 and were left out). Existing events get '' for the new
NOT NULL columns.
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('node_records',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('condition', sa.Enum('UP', 'DRAIN', 'DOWN', name='nodecondition', native_enum=False, length=32), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('since', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=160), nullable=True))
        batch_op.add_column(sa.Column('notify_after', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('notify_claim', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True))
        batch_op.add_column(sa.Column('notify_claimed_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('notify_done', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('notify_error', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_events_notify_after'), ['notify_after'], unique=False)
        batch_op.create_index('ux_events_key', ['key'], unique=True)

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=True))

def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('email')

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ux_events_key')
        batch_op.drop_index(batch_op.f('ix_events_notify_after'))
        batch_op.drop_column('notify_error')
        batch_op.drop_column('notify_done')
        batch_op.drop_column('notify_claimed_until')
        batch_op.drop_column('notify_claim')
        batch_op.drop_column('notify_after')
        batch_op.drop_column('key')

    op.drop_table('node_records')
