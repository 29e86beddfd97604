"""public services: a service its owner made callable without a token (a rate limit per client
address holds it), as the platform's plain `curl -X POST URL/service/NAME -T cat.jpg` expects

Revision ID: 0009_public_services
Revises: 0008_token_scopes
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0009_public_services'
down_revision = '0008_token_scopes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('services') as batch:
        batch.add_column(sa.Column('public', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('services') as batch:
        batch.drop_column('public')
