"""registries and builds: a user's sealed registry accounts; Dockerfile builds run as Slurm jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'registry_credentials',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('user_id', sa.Integer(), sa.ForeignKey('users.id'), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('username', sa.String(length=255), nullable=False),
        sa.Column('password_sealed', sa.Text(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('checked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.UniqueConstraint('user_id', 'host', name='uq_registry_credentials_user_host'),
    )
    op.create_index('ix_registry_credentials_user_id', 'registry_credentials', ['user_id'])
    op.create_table(
        'image_builds',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('user_id', sa.Integer(), sa.ForeignKey('users.id'), nullable=False),
        sa.Column('tag', sa.String(length=1024), nullable=False),
        sa.Column('digest', sa.String(length=80), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('slurm_job_id', sa.String(length=32), nullable=True),
        sa.Column('build_dir', sa.String(length=1024), nullable=False),
        sa.Column('log_path', sa.String(length=1024), nullable=False),
        sa.Column('message', sa.String(length=2000), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    )
    op.create_index('ix_image_builds_user_id', 'image_builds', ['user_id'])


def downgrade() -> None:
    op.drop_index('ix_image_builds_user_id', 'image_builds')
    op.drop_table('image_builds')
    op.drop_index('ix_registry_credentials_user_id', 'registry_credentials')
    op.drop_table('registry_credentials')
