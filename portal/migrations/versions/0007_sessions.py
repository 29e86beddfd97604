"""web sessions: a logged-in browser's session kept on the server (only the sha256 of its random
id; the cookie holds the id), so that logging out, "log out everywhere", a password change and
the idle and absolute timeouts end it

Revision ID: 0007_sessions
Revises: 0006
Create Date: 2026-12-08
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007_sessions'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'web_sessions',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('id_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('user_id', sa.Integer(), sa.ForeignKey('users.id'), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('last_seen_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('address', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('user_agent', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.UniqueConstraint('id_sha256'),
    )
    op.create_index('ix_web_sessions_user_id', 'web_sessions', ['user_id'])


def downgrade() -> None:
    op.drop_index('ix_web_sessions_user_id', 'web_sessions')
    op.drop_table('web_sessions')
