"""inference services and their replicas

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Generated with alembic autogenerate (against a database at 0001; 0002, health events, touches
other tables).
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('services',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=48), nullable=False),
    sa.Column('state', sa.Enum('RUNNING', 'UPDATING', 'DELETING', name='servicestate', native_enum=False, length=32), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('spec_json', sa.Text(), nullable=False),
    sa.Column('next_generation', sa.Integer(), nullable=True),
    sa.Column('next_spec_json', sa.Text(), nullable=True),
    sa.Column('min_replicas', sa.Integer(), nullable=False),
    sa.Column('max_replicas', sa.Integer(), nullable=False),
    sa.Column('desired', sa.Integer(), nullable=False),
    sa.Column('target_inflight', sa.Float(), nullable=False),
    sa.Column('scale_down_delay_s', sa.Float(), nullable=False),
    sa.Column('low_since', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failure_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
    sa.Column('service_dir', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('services', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_services_user_id'), ['user_id'], unique=False)

    op.create_table('service_replicas',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('service_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('phase', sa.Enum('PENDING', 'STARTING', 'READY', 'UNHEALTHY', 'DRAINING', 'ENDED', name='phase', native_enum=False, length=32), nullable=False),
    sa.Column('slurm_job_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('job_dir', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('probe_failures', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('last_inflight_seconds', sa.Float(), nullable=True),
    sa.Column('last_sample_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('avg_inflight', sa.Float(), nullable=True),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('ready_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('unhealthy_since', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('draining_since', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('service_replicas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_service_replicas_phase'), ['phase'], unique=False)
        batch_op.create_index(batch_op.f('ix_service_replicas_service_id'), ['service_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('service_replicas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_service_replicas_service_id'))
        batch_op.drop_index(batch_op.f('ix_service_replicas_phase'))

    op.drop_table('service_replicas')
    with op.batch_alter_table('services', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_services_user_id'))

    op.drop_table('services')
