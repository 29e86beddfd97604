"""gray release and replica keys: the share of requests the next version of a service takes;
the sealed key its replicas take requests with

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('services') as batch_op:
        batch_op.add_column(sa.Column('next_weight', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('key_sealed', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('services') as batch_op:
        batch_op.drop_column('key_sealed')
        batch_op.drop_column('next_weight')
